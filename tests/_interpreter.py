"""Run a test script under Triton's CPU interpreter, in a subprocess.

``TRITON_INTERPRET=1`` must be set before Triton first defines a kernel, so the kernels cannot be
interpreted in the test process (which imports them compiled-for-GPU, or not at all). Each script
gets the tests folder as ``sys.argv[1]`` and the output path as ``sys.argv[2]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_interpreted(script: str, output: Path) -> None:
    """Run ``script`` with ``TRITON_INTERPRET=1``; its stderr tail is the failure message."""
    completed = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent), str(output)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

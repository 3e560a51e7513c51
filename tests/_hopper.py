"""Ahead-of-time compilation of Triton kernels for an H100 (sm_90) without a GPU, shared by the kernel tests:
it catches what the interpreter forgives, and ``ptxas -v`` (the one Triton ships) reports register spills."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any


def hopper_ptx(kernel: Any, runtime: dict[str, str], constants: dict[str, Any], num_warps: int) -> str:
    """PTX of ``kernel`` for sm_90 with run-time arguments of the given Triton types and these constexprs."""
    return hopper_asm(kernel, runtime, constants, num_warps, "ptx")


def hopper_asm(kernel: Any, runtime: dict[str, str], constants: dict[str, Any], num_warps: int, stage: str) -> str:
    """One stage of ``kernel``'s compilation for sm_90 ("ttgir": Triton's GPU IR, where layouts and barriers show)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**runtime, **{name: "constexpr" for name in constants}}
    source = ASTSource(
        fn=kernel, signature=signature,
        constexprs={(kernel.arg_names.index(name),): value for name, value in constants.items()},
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm[stage]


def ptxas_report(ptx: str) -> str | None:
    """``ptxas -v``'s resource report for ``ptx`` on sm_90a (registers, spill stores and loads), or None when the
    installed Triton ships no ``ptxas``."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        completed = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(path), "-o", os.devnull],
                                   capture_output=True, text=True, timeout=120, check=True)
    return completed.stdout + completed.stderr

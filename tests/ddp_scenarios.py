"""Several DDP scenarios of tests/test_ddp.py in one launch of 2 CPU processes, one after another, so that the
processes start, import and join the process group once. Each scenario is a module's ``main(OUT.json)``, whose
docstring describes it; the one whose last fit fails on purpose (Lightning then ends the other rank) comes last.

Run by tests/test_ddp.py as ``python ddp_scenarios.py OUT_DIR MONITOR [MONITOR ...]`` (the monitors of ``fit``):
scenario ``<name>`` writes ``OUT_DIR/<name>.json``.
"""

import sys
from pathlib import Path

import ddp_collapse_offset
import ddp_eval_padding
import ddp_fit
import ddp_late_taps
import ddp_probe_padding
import ddp_sensitive_padded
import ddp_sensitive_sharded

# ddp_eval_padding first: the launching process writes its checkpoint before Lightning starts rank 1
SCENARIOS = {
    "eval_padding": ddp_eval_padding.main,
    "fit": lambda out_path: ddp_fit.main("ddp", out_path, sys.argv[2:]),
    "late_taps": ddp_late_taps.main,
    "sensitive_padded": ddp_sensitive_padded.main,
    "probe_padding": ddp_probe_padding.main,
    "collapse_offset": ddp_collapse_offset.main,
    "sensitive_sharded": ddp_sensitive_sharded.main,
}

if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    for name, main in SCENARIOS.items():
        main(str(out_dir / f"{name}.json"))

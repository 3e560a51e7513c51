"""The test suite's 2-process DDP scenarios (2 CPU processes, gloo), several in one launch, one after another, so that
the processes start, import and join the process group once per launch rather than once per scenario (8-10 s each on
CI's 2 cores). Each scenario is a function of a module or test file that describes it.

tests/conftest.py's ``ddp_scenario`` fixture launches the scenarios its tests ask for, in ``SCENARIOS``' order: a
scenario in ``ENDERS`` ends its processes on purpose (a fit stopped on one rank: Lightning or the scenario ends the
other), so it is the last of its launch.

Run as ``python ddp_scenarios.py OUT_DIR NAME [NAME ...]``: scenario NAME runs in ``OUT_DIR/NAME/`` (its working
directory) and writes its JSON there, then ``returned.RANK`` on each rank whose scenario function returned (what the
exit status of a launch of its own told).
"""

import importlib
import os
import sys
from pathlib import Path

#: Scenario name: (module, function, what the function takes: ``"dir"``, its directory, or ``"file"``, the path
#: ``DIR/out`` of the one file it writes). eval_padding first: its launching process writes its checkpoint before
#: Lightning starts rank 1. The model-parallel ones (FSDP2, tensor parallelism) after the plain DDP ones, enders last.
SCENARIOS = {
    "eval_padding": ("ddp_eval_padding", "main", "file"),
    "fit": ("ddp_fit", "ddp", "file"),
    "late_taps": ("ddp_late_taps", "main", "file"),
    "sensitive_padded": ("ddp_sensitive_padded", "main", "file"),
    "probe_padding": ("ddp_probe_padding", "main", "file"),
    "collapse_offset": ("ddp_collapse_offset", "main", "file"),
    "tracking_inputs": ("ddp_tracking_inputs", "main", "file"),
    "epoch_end": ("ddp_epoch_end", "main", "file"),
    "stan_alarms": ("ddp_stan_alarms", "main", "file"),
    "pre_sharded": ("test_ddp_probe_r21", "pre_sharded", "dir"),
    "late_writer": ("test_probe_ddp_r26", "late_writer", "dir"),
    "rank_grids": ("test_massive_r27", "rank_grids", "dir"),
    "rank_zero_draws": ("test_review_r29", "rank_zero_draws", "dir"),
    "fsdp2": ("test_ddp_probe_r21", "fsdp2", "dir"),
    "model_parallel": ("test_ddp_r21", "model_parallel_case", "file"),
    "sensitive_sharded": ("ddp_sensitive_sharded", "main", "file"),
    "r21_ddp": ("test_ddp_r21", "ddp_case", "file"),
    "ctrl_c_in_validation": ("ddp_ctrl_c_in_validation", "main", "file"),
}
ENDERS = {"sensitive_sharded", "r21_ddp", "ctrl_c_in_validation"}


def launches(names: set[str]) -> list[list[str]]:
    """``names`` in ``SCENARIOS``' order, cut after each ender: the fewest launches that run them all."""
    runs, run = [], []
    for name in SCENARIOS:
        if name in names:
            run.append(name)
            if name in ENDERS:
                runs.append(run)
                run = []
    return runs + [run] if run else runs


if __name__ == "__main__":
    from conftest import forget_said_once

    out_dir = Path(sys.argv[1])
    for name in sys.argv[2:]:
        module, function, takes = SCENARIOS[name]
        directory = out_dir / name
        directory.mkdir(exist_ok=True)
        os.chdir(directory)
        forget_said_once()  # each scenario's once-per-process warnings said again, as in a process of its own
        scenario = getattr(importlib.import_module(module), function)
        scenario(directory if takes == "dir" else str(directory / "out"))
        (directory / f"returned.{os.environ.get('LOCAL_RANK', 0)}").touch()

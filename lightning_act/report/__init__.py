"""Look at a run: a self-contained HTML report from local logs, and a W&B workspace layout.

``lightning_act report RUN_DIR`` → :func:`lightning_act.report.main` (from :mod:`.html`);
``lightning_act wandb-dashboard --project P`` → :func:`lightning_act.report.wandb_dashboard.main`.
"""

from __future__ import annotations

from lightning_act.report.html import build_report, main
from lightning_act.report.runlog import RunLog, load_run

__all__ = ["RunLog", "build_report", "load_run", "main"]

"""Layers a monitor could not measure, kept next to the run so the report can list them.

A monitor that skips a layer says why once (a log line) — and that line is gone when the
console is. :func:`record_skipped` also writes the reason to ``<run dir>/monitors/skipped.json``
(``run dir`` being the CSV logger's version folder, where ``plots/`` lives), which
:func:`read_skipped` reads back for ``lightning_act report``. The file maps
``monitor prefix → what was skipped → layer → reason``::

    {"massive": {"emergence fit": {"model.blocks.3": "5 ratio points, the fit needs at least 6"}}}

Writing merges into what is there, so several monitors (and a resumed fit) share one file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lightning_act._files import written_whole

#: The file's place under a run's (CSV version) folder.
SKIPPED_FILE = Path("monitors") / "skipped.json"


@dataclass(frozen=True)
class SkippedLayer:
    """One layer a monitor did not measure, and why."""

    monitor: str
    what: str
    layer: str
    reason: str


def record_skipped(
    run_dir: str | Path, monitor: str, what: str, reasons: Mapping[str, str], layers: Iterable[str] | None = None,
) -> Path:
    """Merge ``{layer: reason}`` for ``monitor``'s ``what`` into ``run_dir/monitors/skipped.json``.

    ``reasons`` replaces what was recorded before for that monitor and ``what`` (an empty
    mapping clears it: nothing is skipped any more); with ``layers``, only those layers' entries
    (the layers this monitor measures: two monitors of one class on other modules share the
    prefix, and one must not clear the other's). The file is replaced atomically, so a
    crash never leaves it half-written.
    """
    path = Path(run_dir) / SKIPPED_FILE
    content: dict[str, dict[str, dict[str, str]]] = {}
    if path.is_file():
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            content = {}
    mine = None if layers is None else {str(layer) for layer in layers}
    others = {} if mine is None else {
        layer: reason for layer, reason in content.get(monitor, {}).get(what, {}).items() if layer not in mine
    }
    content.setdefault(monitor, {})[what] = others | {str(layer): str(reason) for layer, reason in reasons.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as partial:  # a kill leaves no temporary beside it either (before round 28 it did)
        partial.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_skipped(dirs: list[Path]) -> tuple[list[SkippedLayer], list[str]]:
    """Every skipped layer recorded under ``dirs`` and notes on unreadable files. A later folder's record of a
    (monitor, what) replaces an earlier one whole, as :func:`record_skipped` does within a folder: a resumed fit that
    fitted a layer the first fit skipped lists it no more."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    notes: list[str] = []
    for directory in dict.fromkeys(dirs):
        path = directory / SKIPPED_FILE
        if not path.is_file():
            continue
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
            records = {(str(m), str(w)): {str(k): str(v) for k, v in layers.items()}
                       for m, by_what in content.items() for w, layers in by_what.items()}
        except (ValueError, AttributeError) as error:
            notes.append(f"could not read {path} ({error}); its skipped layers are not listed")
            continue
        found.update(records)
    skipped = [SkippedLayer(m, w, layer, reason) for (m, w), layers in found.items() for layer, reason in layers.items()]
    return skipped, notes

"""Whether Triton is usable: one decision for the Triton kernels of :mod:`lightning_act.nn` and
:mod:`lightning_act.stats`, made by importing it once.

``find_spec`` alone also finds a triton that cannot be imported (a build for another torch, a broken install);
the kernels' import then raised inside ``import timm``, every CLI command, or a monitor mid-fit, where the
PyTorch paths could have run. Such a triton counts as absent, and the first CUDA tensor that would have taken
a Triton path says so once.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings

TRITON_FIX = "reinstall the triton your torch build pins (`pip check` names it) or `pip uninstall triton`"
_warned: list[str] = []


@functools.lru_cache(maxsize=None)
def triton_import_problem() -> str | None:
    """Why the installed triton does not import (``"ImportError: ..."``), or None when it imports or is not
    installed. Any exception counts: a mismatched build raises more than ImportError. Tried once per process."""
    if importlib.util.find_spec("triton") is None:  # not installed, or blocked (``sys.modules["triton"] = None``)
        return None
    try:
        importlib.import_module("triton.language")  # what the kernels are written in
    except Exception as error:  # noqa: BLE001
        if isinstance(error, ModuleNotFoundError) and error.name == "triton":
            return None  # not installed: the PyTorch paths, as always without Triton
        return f"{type(error).__name__}: {error}"
    return None


def triton_usable() -> bool:
    """True when triton is installed (``find_spec``, a cheap check per call) and imports (tried once)."""
    return importlib.util.find_spec("triton") is not None and triton_import_problem() is None


def triton_requirement() -> str:
    """What an explicit Triton request lacks, for its one-line error: triton, or a triton that imports."""
    problem = triton_import_problem()
    if problem is None:
        return "triton installed (pip install triton)"
    return f"a triton that imports, and the installed one does not ({problem}); {TRITON_FIX}"


def warn_triton_unusable() -> None:
    """Say once per process that the installed triton does not import. Called where a Triton path would have run
    (CUDA tensors): on a CPU, or with no triton installed, the PyTorch paths are the usual ones."""
    problem = triton_import_problem()
    if problem is not None and not _warned:
        _warned.append(problem)
        warnings.warn(
            f"triton is installed but does not import ({problem}); lightning_act runs its PyTorch paths instead of "
            f"the Triton kernels; {TRITON_FIX}",
            stacklevel=3,
        )

"""Register the KAT, STAN and Spectral-NN models with timm once timm is imported, without importing timm ourselves.

``import lightning_act`` must make ``timm.create_model("kat_tiny_patch16_224")`` (and ``"stan_tiny"``,
``"spectral_nn"``) work, but importing
timm (and torchvision with it) costs seconds that ``lightning_act --help`` and monitor-only users
should not pay. So the registration runs right after timm's own import finishes — at once if timm
is already imported, else from an import hook that removes itself once timm's module has run.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


def _register() -> None:
    # their @register_model factories run on import: kat_*, stan_*, spectral_nn
    import lightning_act.models.kat  # noqa: F401
    import lightning_act.models.spectral_nn  # noqa: F401
    import lightning_act.models.stan  # noqa: F401


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds timm through the other finders and wraps its loader to register KAT afterwards.

    Stays in ``sys.meta_path`` until timm's module has run: a ``importlib.util.find_spec("timm")`` that only checks
    availability (``import transformers``, lightning_utilities' ``RequirementCache``) asks for a spec that is never
    executed, and the later ``import timm`` must still register.
    """

    def __init__(self) -> None:
        self._searching = False  # a finder that asks importlib for "timm" itself must not bring the search back here

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != "timm" or self._searching:
            return None
        spec = None
        self._searching = True
        try:
            for finder in list(sys.meta_path):
                if finder is not self and hasattr(finder, "find_spec"):
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        break
        finally:
            self._searching = False
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def register_kat_with_timm() -> None:
    if "timm" in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterTimm) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimm())

import os
import sys
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, especially on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


#: The modules whose once-per-process warnings are said again in each test: their module-level ``*_warned``
#: containers (sets, weak sets and maps).
_SAID_ONCE_MODULES = ("lightning_act.callbacks.probe", "lightning_act.tasks.sampler_padding", "lightning_act._triton")


@pytest.fixture(autouse=True)
def _said_once_forgotten() -> None:
    """Each test starts with lightning_act's and Dynamo's once-per-process warnings unsaid: a test asserting a warning
    (or its absence) passed or failed by which tests had said it before in the process. A module not imported yet
    has said nothing."""
    for name in _SAID_ONCE_MODULES:
        module = sys.modules.get(name)
        for attribute, said in vars(module).items() if module is not None else ():
            if attribute.endswith("_warned") and callable(getattr(said, "clear", None)):
                said.clear()
    dynamo_utils = sys.modules.get("torch._dynamo.utils")
    if dynamo_utils is not None:
        dynamo_utils.warn_once_cache.clear()  # Dynamo's warn_once (its lru_cache warning among them)

"""A stand-in for Triton's CUDA driver, so Triton's real launch path runs on a machine without a GPU.

Kernels compile for an H100 (sm_90, with the ptxas that ships in the triton wheel); loading and launching them do
nothing. What remains of a launch is its host work: binding and specialising the arguments, the cache lookups and
the launcher call. ``bench_rational.py --sections host --standin-driver`` times it. Install the stand-in before
the first launch, in a process without ``TRITON_INTERPRET`` (the scripts import this module as
``_triton_standin``).
"""

from __future__ import annotations

from typing import Any

from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class _Utils:
    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple[int, int, int, int, int]:
        """``(module, function, registers, spills, max threads)`` of a kernel that is never loaded."""
        return 1, 1, 32, 0, 1024

    def get_device_properties(self, device: int) -> dict[str, int]:
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}  # an H100's

    def unload_module(self, module: int) -> None:
        pass


class StandInDriver:
    """Device 0, stream 0, target sm_90; every launch is a no-op."""

    utils = _Utils()

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def launcher_cls(self, src: Any, metadata: Any) -> Any:
        return lambda *launch: None


def install() -> None:
    """Make the stand-in the active Triton driver, for the rest of this process."""
    driver.set_active(StandInDriver())

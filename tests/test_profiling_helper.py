"""scripts/_profiling.py: GPU busy time counts each kernel once (hand-built profiler events, no GPU needed)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent


def load_profiling() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("_profiling", Path(__file__).parents[1] / "scripts" / "_profiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def event(index: int, name: str, start: int, end: int, device: DeviceType, annotation: bool = False) -> FunctionEvent:
    return FunctionEvent(
        id=index, name=name, thread=0, start_us=start, end_us=end, device_type=device, device_index=0,
        is_user_annotation=annotation, use_device="cuda",
    )


def test_kernels_count_once_and_annotations_not_at_all() -> None:
    """A profile of one ``aten::mm`` that launched two 5 us kernels and one 3 us kernel, inside an optimizer
    annotation spanning 50 us: 13 us of GPU time, not 26 (the CPU op's self device time holds its kernels again)
    nor 63 (the annotation too)."""
    kernels = [event(1, "gemm", 0, 5, DeviceType.CUDA), event(2, "gemm", 10, 15, DeviceType.CUDA),
               event(3, "reduce", 20, 23, DeviceType.CUDA)]
    mm = event(0, "aten::mm", 0, 30, DeviceType.CPU)
    for kernel in kernels:
        mm.append_kernel(kernel.name, 0, kernel.time_range.elapsed_us())
    annotation = event(4, "Optimizer.step#AdamW.step", 0, 50, DeviceType.CUDA, annotation=True)
    events = [mm, *kernels, annotation]
    assert mm.self_device_time_total == 13  # what summing every event would count a second time

    times, launches = load_profiling().device_kernel_times(events)

    assert dict(times) == {"gemm": 10, "reduce": 3}
    assert dict(launches) == {"gemm": 2, "reduce": 1}
    assert sum(each.self_device_time_total for each in events) == 13 + 13 + 50  # the old diagnosis's "GPU busy"

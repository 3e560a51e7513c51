"""What the benchmark scripts read from a ``torch.profiler`` profile (imported by them as ``_profiling``)."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

import torch


def device_kernel_times(events: Iterable[Any]) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """GPU time (us) and launch count per kernel name from a profile's events (``profiler.events()``).

    Only the kernels themselves count. A CPU operation's ``self_device_time_total`` is the time of the kernels it
    launched, which the kernels' own events hold already; a user annotation on the GPU timeline
    (``Optimizer.step#AdamW.step``) is a range over kernels, idle gaps included. Summing every event, as the
    diagnosis of H100 round 3 did, counts each kernel twice; keeping the annotation, as KAT's H100 runs 1-4 did,
    added 2.7 ms to ViT-S's busy time and 5.2 ms to KAT-S's.
    """
    times: collections.Counter[str] = collections.Counter()
    launches: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation:
            times[event.key] += event.self_device_time_total
            launches[event.key] += 1
    return times, launches

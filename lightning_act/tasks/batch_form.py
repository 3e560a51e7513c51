"""The form of the batches a task unpacks, checked where it unpacks them: one line instead of a deep traceback.

Another task's data module (``--data`` swapped on a recipe) gives batches of another form: EEG windows
``(x, y, subject)`` into ``ImageClassifier`` ended in a 40-line traceback at ``x, y = batch``, and batches that do
unpack end in a convolution's or an embedding's error. The check reads the batch's structure and its tensors'
shapes and dtypes (metadata: no host sync), at the first batch of each loader pass (``batch_idx`` 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_act.errors import DataFormatError

#: The words a loop's batches are told by in the message.
_STAGE_DATA = {"train": "training", "val": "validation", "test": "test", "predict": "predict"}


@dataclass(frozen=True)
class Part:
    """One tensor of a batch: ``name`` what it is and its shape (``"images (B, C, H, W)"``), ``ndim`` its number of
    dimensions (the least number with ``at_least``: an example of any shape), ``kind`` whether its values are
    floating-point, token ids as an embedding takes them (``"int"``: int32 or int64), or class indices as
    ``cross_entropy`` takes them (``"int64"``: int64 or uint8), ``None``: any (other integer types passed a plain
    integer check and failed in the embedding or the loss with a traceback)."""

    name: str
    ndim: int
    kind: Literal["float", "int", "int64"] | None
    at_least: bool = False

    @property
    def text(self) -> str:
        return self.name if self.kind is None else f"{self.name} {self.kind}"

    def fits(self, value: Any) -> bool:
        if not isinstance(value, torch.Tensor):
            return False
        if (value.ndim < self.ndim) if self.at_least else (value.ndim != self.ndim):
            return False
        if self.kind == "float":
            return value.is_floating_point()
        if self.kind == "int":
            return value.dtype in (torch.int32, torch.int64)
        if self.kind == "int64":
            return value.dtype in (torch.int64, torch.uint8)
        return True


@dataclass(frozen=True)
class BatchForm:
    """A task's batches: a tuple (or list) of ``parts``, then up to ``extra`` more ``(B,)`` tensors, every tensor with
    the same ``B`` (``extra_text``, added to the form's text, says what the extra tensors are, or a condition); with ``labels_of_leading_shape`` the second part's shape is
    the first's without its last axis (a pixel's label per spectrum); ``example`` names a data module that gives
    them, if any."""

    parts: tuple[Part, ...]
    example: str = ""
    extra: int = 0
    extra_text: str = ""
    labels_of_leading_shape: bool = False

    @property
    def text(self) -> str:
        return "(" + ", ".join(part.text for part in self.parts) + ")" + self.extra_text

    def fits(self, batch: Any, inputs_only: bool) -> bool:
        """Whether ``batch`` has this form; with ``inputs_only`` (a predict batch: all that ``predict_step`` reads)
        only its first part."""
        if not isinstance(batch, (tuple, list)) or not batch:
            return False
        if inputs_only:
            return self.parts[0].fits(batch[0])
        if not len(self.parts) <= len(batch) <= len(self.parts) + self.extra:
            return False
        return (
            all(part.fits(value) for part, value in zip(self.parts, batch))
            and all(isinstance(value, torch.Tensor) and value.ndim == 1 for value in batch[len(self.parts):])
            and len({value.shape[0] for value in batch}) == 1  # one batch size B
            and (not self.labels_of_leading_shape or batch[1].shape == batch[0].shape[:-1])
        )

    def check(self, batch: Any, batch_idx: int, task: str, stage: str, inputs_only: bool | None = None) -> None:
        """Raise ``DataFormatError`` when the first batch of a ``stage`` loader pass is not of this form; of its inputs
        alone with ``inputs_only`` (by default for predict batches; a probe forward is given the inputs alone)."""
        inputs_only = stage == "predict" if inputs_only is None else inputs_only
        if batch_idx != 0 or self.fits(batch, inputs_only):
            return
        wanted = f"start with {self.parts[0].text}" if inputs_only else "have this form"
        example = f" (e.g. {self.example})" if self.example else ""
        data = _STAGE_DATA[stage]
        if inputs_only and isinstance(batch, (tuple, list)) and batch:
            got = f"the inputs of its {data} data are {describe_batch(batch[0])}"
        else:
            got = f"its {data} data gives {describe_batch(batch)}"
        raise DataFormatError(
            f"{task} takes batches {self.text}, but {got}; pass a data module whose batches {wanted}{example}"
        )


def describe_batch(batch: Any) -> str:
    """What a batch is, in a few words: its type, its number of parts, its tensors' shapes and dtypes."""
    if isinstance(batch, torch.Tensor):
        return f"a tensor {_describe_tensor(batch)}"
    if isinstance(batch, (tuple, list)):
        parts = ", ".join(_describe_tensor(v) if isinstance(v, torch.Tensor) else type(v).__name__ for v in batch)
        return f"a {type(batch).__name__} of {len(batch)}: {parts}"
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {', '.join(repr(key) for key in batch)}"
    return f"a {type(batch).__name__}"


def _describe_tensor(value: torch.Tensor) -> str:
    return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"

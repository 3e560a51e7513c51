"""Byte-level text from Python's own standard library: real text that ships with every install.

Why this corpus: the recipes must run offline on a fresh install, and the standard library's
``.py`` sources are several megabytes of real, human-written English docstrings and comments
interleaved with code, a text distribution with the recurring delimiters (newlines, ``.``,
indentation) on which massive activations form in language models (Sun et al. 2024 find them on
the first token and on the first ``.`` / ``\\n``). Bytes need no tokenizer (vocabulary 256).

Determinism: the file list is every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` except
the test suites (``test``/``tests``/``idle_test`` folders) and ``site-packages``, sorted by
relative path; file ``i`` of that list is a validation file when ``i % val_every == 0``, so the
split is by file (no sequence straddles train and validation) and the same on every run of the
same Python version (:attr:`StdlibTextDataModule.corpus_summary` records the version, file counts
and byte counts). Files are joined with a ``\\x00`` separator; sequences are non-overlapping
windows of ``seq_len + 1`` bytes (inputs and next-byte targets).
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_act.data.checks import check_loader_args, check_whole
from lightning_act.data.splits import EpochShuffleSampler
from lightning_act.errors import DataNotFoundError

_SKIPPED_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_python_files(root: str | Path | None = None) -> list[Path]:
    """The corpus files: sorted ``*.py`` under the standard library (or ``root``), test suites excluded."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = [p for p in base.rglob("*.py") if not _SKIPPED_PARTS.intersection(p.relative_to(base).parts[:-1])]
    if not files:
        raise DataNotFoundError(f"no .py files under {base}; pass root= a folder of Python sources")
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def read_corpus(files: list[Path], max_bytes: int | None) -> torch.Tensor:
    """The files' bytes joined by ``\\x00``, in order, cut at ``max_bytes``: a uint8 tensor."""
    chunks: list[bytes] = []
    total = 0
    for path in files:
        data = path.read_bytes() + b"\x00"
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    joined = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8).clone()


class ByteWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` bytes: ``(input_ids, targets)`` as int64 (seq_len,)."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        self.data = data
        self.seq_len = seq_len
        self.count = (data.numel() - 1) // seq_len
        if self.count < 1:
            raise DataNotFoundError(f"{data.numel()} bytes hold no window of {seq_len + 1}; lower seq_len")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.data[index * self.seq_len : (index + 1) * self.seq_len + 1].to(torch.int64)
        return window[:-1], window[1:]


class StdlibTextDataModule(pl.LightningDataModule):
    """Next-byte prediction on the standard library's sources, split by file.

    Args:
        seq_len: bytes per training sequence.
        batch_size: sequences per batch.
        val_every: every ``val_every``-th file (in sorted order) is held out for validation.
        max_train_bytes, max_val_bytes: cut the corpora (None: all of it).
        root: a folder of ``.py`` files instead of the standard library.
        num_workers: DataLoader workers.
        seed: shuffling seed of the training windows.
    """

    vocab_size = 256

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 32,
        val_every: int = 10,
        max_train_bytes: int | None = 4_000_000,
        max_val_bytes: int | None = 400_000,
        root: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_whole("val_every", val_every, 2, 10)
        check_whole("seq_len", seq_len, 1, 128, "a whole number of bytes per training sequence")
        for name, cap in (("max_train_bytes", max_train_bytes), ("max_val_bytes", max_val_bytes)):
            if cap is not None:
                check_whole(name, cap, 1, 4_000_000, "a whole number of bytes")
        if root is not None and not Path(root).is_dir():
            raise DataNotFoundError(f"root folder '{root}' does not exist; pass --data.root with a folder of Python sources")
        check_loader_args(batch_size, num_workers, seed, numpy_seed=False)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_every = val_every
        self.max_train_bytes = max_train_bytes
        self.max_val_bytes = max_val_bytes
        self.root = root
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: ByteWindows | None = None
        self.val_set: ByteWindows | None = None
        self.corpus_summary: dict[str, object] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files = stdlib_python_files(self.root)
        if len(files) < 2:
            raise DataNotFoundError(
                f"{len(files)} Python file(s) under '{self.root or 'the standard library'}': training and validation need "
                "one each at least; point --data.root at a folder with more .py files"
            )
        val_files = [f for i, f in enumerate(files) if i % self.val_every == 0]
        train_files = [f for i, f in enumerate(files) if i % self.val_every != 0]
        train, val = read_corpus(train_files, self.max_train_bytes), read_corpus(val_files, self.max_val_bytes)
        self.train_set, self.val_set = ByteWindows(train, self.seq_len), ByteWindows(val, self.seq_len)
        self.corpus_summary = {
            "python": sys.version.split()[0], "files": len(files), "train_files": len(train_files),
            "val_files": len(val_files), "train_bytes": int(train.numel()), "val_bytes": int(val.numel()),
        }

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        sampler = EpochShuffleSampler(len(self.train_set), self.seed)  # epoch e's order from (seed, e): resumable
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler,
            num_workers=self.num_workers, drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation windows in corpus order: the first batches are the same fixed sequences every time."""
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

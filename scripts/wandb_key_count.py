"""Count the metric keys a W&B run logged, from its offline run file (no network, no login).

    python scripts/wandb_key_count.py runs/kat/wandb/offline-run-*/

An offline run is stored as ``run-<id>.wandb``: a LevelDB-style log (32 KiB blocks, records
with a 7-byte header: checksum, little-endian length, type full/first/middle/last) of W&B's
protobuf ``Record`` messages. The ``history`` records hold the logged keys; media (images,
tables) are logged as several sub-keys (``<key>/_type``, ``<key>/path`` …) and counted once.
Prints, per run, the scalar metric keys (without ``trainer/global_step``, ``epoch`` and W&B's own
``_step``/``_runtime``/``_timestamp``) and the media keys.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
INDEX_KEYS = {"trainer/global_step", "epoch"}


def records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    position, pending = 7, b""  # file header: ':W&B', magic, version
    while position + HEADER.size <= len(data):
        if BLOCK - position % BLOCK < HEADER.size:  # block trailer too short for a header: padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = HEADER.unpack_from(data, position)
        chunk = data[position + HEADER.size : position + HEADER.size + length]
        position += HEADER.size + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def history_keys(path: Path) -> set[str]:
    from wandb.proto import wandb_internal_pb2

    keys: set[str] = set()
    for raw in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return {k for k in keys if not k.startswith("_")}


def main(paths: list[str]) -> int:
    for run_dir in paths:
        files = sorted(Path(run_dir).glob("run-*.wandb"))
        if not files:
            print(f"{run_dir}: no run-*.wandb file (pass a wandb/offline-run-* folder)", file=sys.stderr)
            return 2
        keys = set().union(*(history_keys(f) for f in files))
        media = {k.rsplit("/", 1)[0] for k in keys if k.endswith("/_type")}
        scalars = sorted(k for k in keys if not any(k.startswith(m + "/") for m in media) and k not in INDEX_KEYS)
        print(f"{run_dir}: {len(scalars)} scalar metric keys, {len(media)} media keys ({', '.join(sorted(media))})")
        print("  " + " ".join(scalars))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Run files written whole: under a temporary name in their folder, then renamed over their name."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some filesystems cannot sync a directory; the file itself was synced before the rename
        pass
    finally:
        os.close(descriptor)


def temporary_name(name: str) -> str:
    """The name :func:`written_whole` writes ``name`` under first: hidden, random (two writers of one file each publish
    a whole one), ending in ``.tmp``."""
    return f".{name}.{secrets.token_hex(8)}.tmp"


def is_temporary_of(path: Path, name: str) -> bool:
    """Whether ``path`` is a temporary :func:`written_whole` left of a write of ``name`` (a kill cut it short)."""
    return re.fullmatch(rf"\.{re.escape(name)}\.[0-9a-f]{{16}}\.tmp", path.name) is not None


@contextlib.contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write ``path``'s content to, fsynced and renamed over ``path`` once the
    block ends (the rename fsynced too): a kill or a full disk mid-write leaves no truncated file under its name (and the previous one intact).
    Whatever stops the block (Ctrl-C too) removes the temporary. A failed write that names no file (a full disk met by
    ``write()``) or the temporary (a folder it cannot write) is raised again naming ``path``, so that its one-line
    message can say where."""
    partial = path.with_name(temporary_name(path.name))
    try:
        yield partial
        with open(partial, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(partial, path)
        fsync_folder(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):  # a read-only folder refuses the removal too
            partial.unlink(missing_ok=True)
        named = getattr(err, "filename", None)
        if isinstance(err, OSError) and err.errno is not None and (
            named is None or (isinstance(named, (str, os.PathLike)) and Path(named).name == partial.name)
        ):
            raise OSError(err.errno, err.strerror, str(path)) from err  # the file's name, not the removed temporary's
        raise

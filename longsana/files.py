"""Output paths: checked before any work starts, and replaced whole or not at all.

`check_output` fails in a moment, not after minutes of generation, where an output cannot be written (a parent is
a regular file, the output is an existing folder, no permission). `replacing` writes a new file or folder into a
temporary sibling and moves it into place only once complete: a failed or interrupted write leaves the destination
as it was, and a folder written over keeps nothing of its former content (an older shard index and its shards would
otherwise be loaded instead of the new weights).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_output(path: str | Path, folder: bool = False) -> None:
    """ValueError unless `path` can be written as a file (or, with `folder`, as a folder): the nearest existing
    ancestor is a folder we may write in, and an existing `path` is of the same kind."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind = ("a file", "a folder")
        raise ValueError(f"{path}: is {kind[not folder]}, expected {kind[folder]}")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ValueError(f"{path}: cannot be created, {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot be created, no permission to write in {parent}")


@contextlib.contextmanager
def replacing(dst: str | Path) -> Iterator[Path]:
    """Yield a path in a temporary sibling folder of `dst`; write the new file or folder there. When the block
    ends normally it takes the place of `dst` (which, if it exists, is removed whole); when it raises, nothing
    changes. A file replaces a file in one rename; a folder takes two (the old one aside, the new one in), so for
    an instant there is no `dst`, but never a mix of old and new."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        new = tmp / dst.name
        yield new
        if dst.is_dir():  # a folder cannot be renamed over a folder that has content
            old = tmp / "old"
            os.rename(dst, old)
            try:
                os.rename(new, dst)
            except OSError:
                os.rename(old, dst)
                raise
        else:
            os.replace(new, dst)  # a file: atomic
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

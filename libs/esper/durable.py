"""Files written whole or not at all, and kept through a power cut: checkpoints, settings, spooled
trajectories, Karn's journal; and the lock that keeps a second process off a folder one is writing. Free of
torch and the wire libraries, so every process can use it."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TextIO


def write_durably(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` to `path` atomically (a temp file renamed over it) and durably: the data is fsynced
    before the rename, and the directory after it (a rename is on disk only once its directory is). What a
    process acks after writing (the learner's checkpoint, a worker's spooled trajectory) then survives a
    power cut too, not only a kill."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_atomic(path: Path, text: str) -> None:
    """`text` to `path` as write_durably writes: a reader (or a resume after a kill) never sees half a file."""
    write_durably(path, lambda f: f.write(text.encode()))


def lock_exclusively(path: Path) -> TextIO | None:
    """The open file `path` (created if need be) holding an exclusive flock, which lasts until it is closed or
    the process ends, killed included (no stale lock to clear by hand); None when another process holds it."""
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle

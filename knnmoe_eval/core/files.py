"""Atomic file writes, checksums and directory locks: a reader never sees half a file, every file a memory lists
is verified, and one build at a time owns a directory."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import save_file

from ..errors import KnnMoeError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to, renamed to `path` when the block succeeds and removed when it
    fails: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_tensors_atomic(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> str:
    """A safetensors file, written atomically; returns its sha256."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return sha256_file(path)


def write_json_atomic(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))


# names our atomic writes (`<name>.tmp<pid>`) and safetensors' own temporary files (`.tmpXXXXXX`) take while a
# file is being written: what a killed writer leaves behind, and nothing else ever is
_LEFTOVER = re.compile(r"\.tmp\w+|.+\.tmp\d+")


def remove_leftovers(directory: Path) -> list[str]:
    """Remove the temporary files a killed writer left in `directory`; returns their names. Call it only while
    holding the directory's lock: a live writer's temporary files look the same."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for p in sorted(directory.iterdir()):
            if p.is_file() and _LEFTOVER.fullmatch(p.name):
                p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


def is_leftover(name: str) -> bool:
    return bool(_LEFTOVER.fullmatch(name))


class DirectoryLock:
    """An exclusive flock on `path`, held by this process until `release` or until it dies: the kernel drops the
    lock of a killed process with its file descriptors, so a crash never leaves it stale (unlike a pid file).

    The file holds who took it (pid, host, start time), which a refused second writer names."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that just started"
            os.close(fd)
            raise KnnMoeError(
                f"{self.what} is being written by another build ({holder}): two builds into one directory would "
                "mix two memories. Wait for it to finish (rerun then to resume it if it stopped), or build into "
                "another directory."
            ) from None
        except OSError:
            os.close(fd)
            raise
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode(), 0)
        self.fd = fd

    def release(self, remove: bool = False) -> None:
        """Drop the lock; `remove` also deletes the file (done while still holding it, so no one else holds it)."""
        if self.fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = None

"""Writing results safely: checks on an output folder made before long work starts (room, locks, the
manifest of what it already holds), and the one way every file of the project is written (whole or not
at all, and durable once written).

The checks make a run that cannot write its results fail in seconds with a clear message instead of
after hours of generation or training.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator


class OutputError(OSError):
    pass


def prepare_output_dir(path: str, needed_bytes: int, what: str) -> None:
    """Create `path` if needed, prove a file can be written there, and refuse when the disk has fewer
    than `needed_bytes` free (an estimate of what the run will write; 0 skips that check)."""
    try:
        os.makedirs(path, exist_ok=True)
        # A uniquely named probe: the ranks of a torchrun job check the same folder at the same time.
        with tempfile.TemporaryFile(dir=path) as f:
            f.write(b"ok")
    except OSError as e:
        raise OutputError(f"cannot write {what} to {path}: {e.strerror or e}") from None
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise OutputError(f"{what} needs up to {needed_bytes / 2**30:.2f} GiB but {path} has "
                          f"{free / 2**30:.2f} GiB free")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary name beside `path` to write to; on success it is synced and renamed to `path`.

    The name is unique, so two writers never share a half-written file; the file is fsynced before the
    rename and the folder after it, so that a power loss leaves the old file or the new one, never a
    truncated one. On an exception the temporary file is removed and `path` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        # Results are ordinary files, readable by a server running as another user. After the writer, not
        # before: mkstemp makes the file private, and safetensors (0.8) replaces it with a private file
        # of its own.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive(folder: str, what: str) -> Iterator[None]:
    """Hold `folder` for this process alone while the block runs: a second run on it is refused at once,
    naming the folder and the process that holds it. The lock is the kernel's (flock), so it ends with
    the process, however that ends; the lock file itself is harmless to leave."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise OutputError(f"{what} {folder} is in use by process {holder}; wait for it to end, or use "
                              "another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json(path: str, obj, indent: int | None = 2) -> None:
    text = json.dumps(obj, indent=indent)
    write_bytes(path, (text + "\n").encode())


def claim_manifest(path: str, manifest: dict, saved: dict | None) -> tuple[dict, dict]:
    """Record what a folder holds, or say how it differs from what it already holds.

    `saved` is the manifest read from `path`, None when there is none: then `manifest` is written there.
    Returns the fields of `manifest` whose recorded values differ, as (recorded, present) values, both
    empty when none does; the caller refuses a difference in its own words."""
    if saved is None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json(path, manifest)
        return {}, {}
    changed = sorted(k for k in manifest if saved.get(k) != manifest[k])
    return {k: saved.get(k) for k in changed}, {k: manifest[k] for k in changed}

"""Checks on an output folder made before long work starts, so that a run that cannot write its
results fails in seconds with a clear message instead of after hours of generation or training."""

from __future__ import annotations

import os
import shutil
import tempfile


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

"""Safetensors files checked from their header before any tensor is read: checkpoints and training shards.

The names, shapes and dtypes a reader expects are compared with the header first, so that a file
with an unexpected tensor, a dtype off the list or a damaged header is refused by name, and a large
file is never read to find that out. Only the dtypes the project writes are on the list, so every
value check after this one (finite values, token ids in range) runs on a dtype it can handle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open

# The dtypes the project writes, by their names in a safetensors header.
_HEADER_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                 torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}
FLOATS = ("F32", "F16", "BF16")
# safetensors reads no larger header; the check here keeps a damaged length from being read at all.
MAX_HEADER_BYTES = 100_000_000

Header = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype as the header names it)


class TensorFileError(ValueError):
    """What is wrong with a tensor file, in words that follow its name ("model.safetensors lacks ...")."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A tensor a reader expects. A size given as a string is named: it takes its value from the first
    tensor that has it (in the order of the expected tensors) and must be the same in every other."""

    shape: tuple[int | str, ...]
    dtypes: tuple[str, ...]
    kind: str = "weights"  # what the tensor holds, for messages

    def shape_text(self, sizes: Mapping[str, int]) -> str:
        dims = [str(sizes.get(d, d)) for d in self.shape]
        return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


def open_checked(file: str, expected: Mapping[str, Spec], optional: frozenset[str] = frozenset()):
    """(safe_open handle, the named sizes, the metadata) of a file whose header holds exactly the
    expected tensors (those in `optional` may be absent); no tensor is read."""
    _check_header_bytes(file)
    try:
        handle = safe_open(file, "pt")
        header = {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype()) for k in handle.keys()}
        metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise TensorFileError(f"is truncated or not a safetensors file ({e})") from None
    return handle, check_header(header, expected, optional), metadata


def header_of(tensors: Mapping[str, torch.Tensor]) -> Header:
    """The header tensors in memory would be written with, to check them as a file is checked."""
    return {k: (tuple(t.shape), _HEADER_NAMES.get(t.dtype, str(t.dtype))) for k, t in tensors.items()}


def check_header(header: Header, expected: Mapping[str, Spec],
                 optional: frozenset[str] = frozenset()) -> dict[str, int]:
    """The sizes the named dimensions take; TensorFileError for the first tensor missing, unexpected,
    of a dtype off its list or of another shape."""
    missing = sorted(set(expected) - set(optional) - set(header))
    if missing:
        raise TensorFileError(f"lacks the tensor(s) {missing}")
    extra = sorted(set(header) - set(expected))
    if extra:
        raise TensorFileError(f"has unexpected tensor(s) {extra}; expected only {sorted(expected)}")
    sizes: dict[str, int] = {}
    for name, spec in expected.items():
        if name not in header:
            continue
        shape, dtype = header[name]
        if dtype not in spec.dtypes:
            allowed = spec.dtypes[0] if len(spec.dtypes) == 1 else f"one of {', '.join(spec.dtypes)}"
            raise TensorFileError(f"has tensor '{name}' of dtype {dtype}; {spec.kind} must be {allowed}")
        fits = len(shape) == len(spec.shape)
        for got, want in zip(shape, spec.shape):
            fits = fits and got == (sizes.setdefault(want, got) if isinstance(want, str) else want)
        if not fits:
            raise TensorFileError(f"has tensor '{name}' of shape {shape} where {spec.shape_text(sizes)} is expected")
    return sizes


def _check_header_bytes(file: str) -> None:
    """Named refusals for two damages safetensors reports only in its own words: a header length the
    file cannot hold (read before anything else, so a damaged length is never read as a size) and a
    header that is not JSON."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > size - 8:
                raise TensorFileError(f"is truncated or not a safetensors file: its first 8 bytes announce a "
                                      f"{length}-byte header, but it is {size} bytes long")
            if length > MAX_HEADER_BYTES:
                raise TensorFileError(f"is not a safetensors file: its first 8 bytes announce a {length}-byte "
                                      f"header, more than the {MAX_HEADER_BYTES} safetensors reads")
            text = f.read(length)
    except OSError as e:
        raise TensorFileError(f"cannot be read ({e.strerror or e})") from None
    try:
        json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"is not a safetensors file: its header is not JSON ({e})") from None
    except RecursionError:
        raise TensorFileError("is not a safetensors file: its header is nested too deeply") from None

"""Training data on disk: safetensors shards of token ids, loss masks and target states (fp16).

A shard holds N sequences back to back: `input_ids` [total] int32, `loss_mask` [total] uint8,
`offsets` [N + 1] int64, `states` [total, W] float16 (the state the draft reads: W is the hidden
width, or several layers' widths for the fused kind) and, for drafts that read pre-norm states,
`final` [total, H] (the target's final post-norm state, for its next-token distribution). Shards are
written whole (outputs.atomic_path).

The states of a large data set do not fit in memory: `ShardSet` keeps the token ids and masks and
reads each sequence's states from the memory-mapped file when a batch asks for them.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..outputs import atomic_path
from ..schema import STATE_FINAL_NORM, state_fields
from ..tensor_files import FLOATS, Spec, open_checked

SHARD_GLOB = "shard-*.safetensors"


class ShardError(ValueError):
    pass


@dataclasses.dataclass
class TrainBatch:
    tokens: torch.Tensor  # [B, T] long
    states: torch.Tensor  # [B, T, W], what the draft reads and regresses onto
    loss_mask: torch.Tensor  # [B, T] bool, position j's state and next token are supervised
    final: torch.Tensor | None = None  # [B, T, H], the target's final post-norm states if not `states`

    def to(self, device) -> TrainBatch:
        return TrainBatch(self.tokens.to(device), self.states.to(device), self.loss_mask.to(device),
                          None if self.final is None else self.final.to(device))

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[1] - 1


def write_shard(path: str, state: str, input_ids: list[torch.Tensor], loss_masks: list[torch.Tensor],
                states: list[torch.Tensor], final: list[torch.Tensor] | None = None,
                metadata: dict[str, str] | None = None) -> None:
    """`state` says which target state the shard holds (schema.state_name)."""
    lengths = torch.tensor([len(t) for t in input_ids])
    tensors = {
        "input_ids": torch.cat(input_ids).to(torch.int32),
        "loss_mask": torch.cat(loss_masks).to(torch.uint8),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        "states": torch.cat(states).to(torch.float16),
    }
    if final is not None:
        tensors["final"] = torch.cat(final).to(torch.float16)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={**(metadata or {}), "state": state})


def shard_range(path: str) -> tuple[int, int] | None:
    """The conversations (first, end) a shard written by `beagle data` holds; None if it has no such record
    or cannot be read (it is then made again)."""
    try:
        with safe_open(path, "pt") as f:
            lo, hi = (f.metadata() or {})["conversations"].split("-")
        return int(lo), int(hi)
    except (OSError, SafetensorError, KeyError, ValueError):
        return None


# What write_shard writes, and so all a shard may hold: the header is checked against it before any
# tensor is read.
_SPECS = {
    "input_ids": Spec(("tokens",), ("I32",), "token ids"),
    "loss_mask": Spec(("tokens",), ("U8",), "loss masks"),
    "offsets": Spec(("sequences + 1",), ("I64",), "sequence offsets"),
    "states": Spec(("tokens", "width"), FLOATS, "states"),
    "final": Spec(("tokens", "final width"), FLOATS, "final states"),
}
_FLOATS = ("states", "final")


class ShardSet:
    """All sequences of the shards in a folder, or in several (their sequences one folder after the
    other, e.g. the target's answers and a file's own answers); `sequences[i]` is a dict of input_ids,
    loss_mask, states and (pre-norm kinds) final.

    Every shard is checked when the set is opened (its header before any tensor is read: keys, dtypes,
    shapes; then the state kind its metadata names, offsets and token ids within `vocab_size` when
    given), and each sequence's states when they are read (finite values), so that a damaged file is
    refused by name here rather than failing somewhere inside a training step.

    `state` "final_norm" reads shards of a pre-norm kind as final-state shards (their `final` tensor as
    the states): one extraction of fused states also trains top-state drafts and the EAGLE-1 baseline.
    """

    def __init__(self, folder: str | list[str], vocab_size: int | None = None, state: str | None = None):
        folders = [folder] if isinstance(folder, str) else list(folder)
        self.folder = ", ".join(folders)  # for messages
        self.files = []
        self._folder_of_file = []
        for k, one in enumerate(folders):
            files = sorted(glob.glob(os.path.join(one, SHARD_GLOB)))
            if not files:
                raise ShardError(f"no training shards ({SHARD_GLOB}) in {one}")
            self.files += files
            self._folder_of_file += [k] * len(files)
        self._handles, self._tokens, self._index = [], [], []
        states, widths = set(), set()
        for number, file in enumerate(self.files):
            try:
                handle, sizes, metadata = open_checked(file, _SPECS, frozenset({"final"}))
                states.add(_state_of(metadata))
                small = {k: handle.get_tensor(k) for k in ("input_ids", "loss_mask", "offsets")}
                _check_shard(small, sizes, vocab_size)
            except ValueError as e:  # TensorFileError too: every message reads on from the shard's name
                raise ShardError(f"training shard {file} {e}") from None
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ShardError(f"training shard {file} is truncated or not a safetensors file ({e})") from None
            widths.add((sizes["width"], sizes.get("final width")))
            self._handles.append(handle)
            offsets = small["offsets"].tolist()
            for start, end in zip(offsets[:-1], offsets[1:]):
                self._index.append((number, start, end))
                self._tokens.append((small["input_ids"][start:end], small["loss_mask"][start:end]))
        if len(states) != 1:
            raise ShardError(f"the shards in {self.folder} do not agree on the target state they hold: "
                             f"{sorted(map(str, states))}")
        if len(widths) != 1:
            raise ShardError(f"the shards in {self.folder} hold states of different widths: {sorted(widths, key=str)}")
        self.state = states.pop()
        width, final_width = widths.pop()
        self._final_view = state is not None and state != self.state
        if self._final_view and (state != STATE_FINAL_NORM or final_width is None):
            raise ShardError(f"the shards in {self.folder} hold {self.state} states, which cannot be read as {state} "
                             f"(only a pre-norm kind's shards can be read as {STATE_FINAL_NORM})")
        self.state = state or self.state
        self.state_width = final_width if self._final_view else width
        self.sequences = _Sequences(self)

    def __len__(self) -> int:
        return len(self._index)

    def fingerprint(self) -> str:
        """sha256 over the names and contents of the shards the sequences in use come from, and their
        number: what a training state was trained on. Contents, not sizes: a shard rewritten in place with
        other states keeps its size. Only those shards (each read through once), so that a fraction of a
        folder keeps its fingerprint, and can resume, while shards beyond it are added."""
        digest = hashlib.sha256(str(len(self)).encode())
        used = sorted({number for number, _, _ in self._index})
        for file in (self.files[number] for number in used):  # several folders: names told apart by contents
            with open(file, "rb") as f:
                digest.update(f"{os.path.basename(file)}:{hashlib.file_digest(f, 'sha256').hexdigest()};".encode())
        return digest.hexdigest()

    def keep_fraction(self, *fractions: float) -> None:
        """Use only the first fraction of each folder's sequences (one fraction for all, or one per folder), at
        least one of each (a prefix of beagle data's seeded order is a uniform sample)."""
        folder_of = [self._folder_of_file[number] for number, _, _ in self._index]
        folders = sorted(set(folder_of))
        if len(fractions) not in (1, len(folders)):
            raise ValueError(f"{len(fractions)} fractions for the {len(folders)} folders {self.folder}")
        fractions *= len(folders) // len(fractions)
        kept = []
        for k, share in zip(folders, fractions):
            mine = [i for i, f in enumerate(folder_of) if f == k]
            kept += mine[:max(1, round(len(mine) * share))]
        self._index = [self._index[i] for i in kept]
        self._tokens = [self._tokens[i] for i in kept]

    def length(self, i: int) -> int:
        _, start, end = self._index[i]
        return end - start

    def tokens(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, loss_mask) of every sequence, without reading any state."""
        return iter(self._tokens)

    def sequence(self, i: int) -> dict[str, torch.Tensor]:
        number, start, end = self._index[i]
        handle, file = self._handles[number], self.files[number]
        ids, mask = self._tokens[i]
        seq = {"input_ids": ids, "loss_mask": mask}
        names = {"final": "states"} if self._final_view else {name: name for name in _FLOATS}
        for stored, name in names.items():
            if stored in handle.keys():
                try:
                    seq[name] = handle.get_slice(stored)[start:end]
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise ShardError(f"training shard {file} cannot be read ({e})") from None
                bad = int((~torch.isfinite(seq[name])).sum())
                if bad:
                    raise ShardError(f"training shard {file} holds {bad} NaN/Inf value(s) in '{stored}' "
                                     f"(sequence {i - self._first_of(number)} of the shard)")
        return seq

    def _first_of(self, number: int) -> int:
        return next(i for i, (n, _, _) in enumerate(self._index) if n == number)

    def batch(self, indices: list[int], max_len: int) -> TrainBatch:
        """Sequences padded (at the end, never supervised) or cut to a common length."""
        seqs = [self.sequence(i) for i in indices]
        length = min(max_len, max(len(s["input_ids"]) for s in seqs))

        def stack(key, dtype):
            rows = []
            for s in seqs:
                x = s[key][:length]
                pad = torch.zeros((length - len(x),) + tuple(x.shape[1:]), dtype=x.dtype)
                rows.append(torch.cat([x, pad]).to(dtype))
            return torch.stack(rows)

        final = stack("final", torch.float32) if "final" in seqs[0] else None
        return TrainBatch(stack("input_ids", torch.long), stack("states", torch.float32),
                          stack("loss_mask", torch.bool), final)


class _Sequences:
    """`ShardSet.sequences`: indexable like a list, each item read when asked for."""

    def __init__(self, shards: ShardSet):
        self._shards = shards

    def __len__(self) -> int:
        return len(self._shards)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._shards.sequence(j) for j in range(*i.indices(len(self)))]
        return self._shards.sequence(range(len(self))[i])

    def __iter__(self):
        return (self._shards.sequence(i) for i in range(len(self)))


def _state_of(metadata: dict[str, str]) -> str:
    """The state kind a shard's metadata names, read by the one codec of state names."""
    if "state" not in metadata:
        raise ValueError("has no metadata field 'state' (the target state it holds, which beagle data records)")
    try:
        state_fields(metadata["state"])
    except ValueError as e:
        raise ValueError(f"has metadata field 'state' {metadata['state']!r}, which is no state kind ({e})") from None
    return metadata["state"]


def _check_shard(small: dict[str, torch.Tensor], sizes: dict[str, int], vocab_size: int | None) -> None:
    """ValueError naming the first value that makes the shard unusable, once its header fits _SPECS."""
    ids, offsets, total = small["input_ids"], small["offsets"], sizes["tokens"]
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != total or bool((offsets.diff() < 1).any()):
        raise ValueError(f"has 'offsets' that do not rise from 0 to its {total} tokens with every sequence holding "
                         f"one at least: {offsets.tolist()[:8]}...")
    if total and int(ids.min()) < 0:
        raise ValueError(f"holds a negative token id ({int(ids.min())}) in 'input_ids'")
    if total and vocab_size is not None and int(ids.max()) >= vocab_size:
        raise ValueError(f"holds token id {int(ids.max())} in 'input_ids', outside the target's vocabulary "
                         f"of {vocab_size}")
    width, final = sizes["width"], sizes.get("final width")
    if width < 1:
        raise ValueError("has 'states' 0 wide")
    if final is not None and (final < 1 or width % final):
        raise ValueError(f"has 'states' {width} wide, which is no whole number of 'final' widths ({final})")

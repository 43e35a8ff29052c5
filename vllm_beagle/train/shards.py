"""Training data on disk: safetensors shards of token ids, loss masks and target states (fp16).

A shard holds N sequences back to back: `input_ids` [total] int32, `loss_mask` [total] uint8,
`offsets` [N + 1] int64, `states` [total, H] float16 (the state the draft reads) and, for drafts that
read a pre-norm state, `final` [total, H] (the target's final post-norm state, for its next-token
distribution). Shards are written to a temporary name and renamed: a shard on disk is whole.
"""

from __future__ import annotations

import glob
import os

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .objective import TrainBatch

SHARD_GLOB = "shard-*.safetensors"


class ShardError(ValueError):
    pass


def write_shard(path: str, state: str, input_ids: list[torch.Tensor], loss_masks: list[torch.Tensor],
                states: list[torch.Tensor], final: list[torch.Tensor] | None = None) -> None:
    """`state` says which target state the shard holds: "final_norm" or "layer:<l>"."""
    lengths = torch.tensor([len(t) for t in input_ids])
    tensors = {
        "input_ids": torch.cat(input_ids).to(torch.int32),
        "loss_mask": torch.cat(loss_masks).to(torch.uint8),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        "states": torch.cat(states).to(torch.float16),
    }
    if final is not None:
        tensors["final"] = torch.cat(final).to(torch.float16)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp", metadata={"state": state})
    os.replace(path + ".tmp", path)


class ShardSet:
    """All sequences of the shards in a folder, each as (input_ids, loss_mask, states, final).

    Every shard is checked as it is read (keys, dtypes, shapes, offsets, finite states, token ids
    within `vocab_size` when given), so that a damaged file is refused by name here rather than
    failing somewhere inside a training step.
    """

    def __init__(self, folder: str, vocab_size: int | None = None):
        self.folder = folder
        self.files = sorted(glob.glob(os.path.join(folder, SHARD_GLOB)))
        if not self.files:
            raise ShardError(f"no training shards ({SHARD_GLOB}) in {folder}")
        self.sequences = []
        states, widths = set(), set()
        for file in self.files:
            try:
                with safe_open(file, "pt") as f:
                    states.add((f.metadata() or {}).get("state"))
                shard = load_file(file)
            except (SafetensorError, OSError) as e:
                raise ShardError(f"training shard {file} is truncated or not a safetensors file ({e})") from None
            try:
                _check_shard(shard, vocab_size)
            except ValueError as e:
                raise ShardError(f"training shard {file}: {e}") from None
            widths.add(shard["states"].shape[1])
            offsets = shard["offsets"].tolist()
            for start, end in zip(offsets[:-1], offsets[1:]):
                self.sequences.append({k: shard[k][start:end] for k in shard if k != "offsets"})
        if len(states) != 1 or None in states:
            raise ShardError(f"the shards in {folder} do not agree on the target state they hold: "
                             f"{sorted(map(str, states))}")
        if len(widths) != 1:
            raise ShardError(f"the shards in {folder} hold states of different widths: {sorted(widths)}")
        self.state = states.pop()

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(self, indices: list[int], max_len: int) -> TrainBatch:
        """Sequences padded (at the end, never supervised) or cut to a common length."""
        seqs = [self.sequences[i] for i in indices]
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


_INTEGER = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_shard(shard: dict[str, torch.Tensor], vocab_size: int | None) -> None:
    """ValueError naming the first thing that makes the shard unusable."""
    required = ("input_ids", "loss_mask", "offsets", "states")
    missing = [k for k in required if k not in shard]
    if missing:
        raise ValueError(f"lacks the tensor(s) {missing}")
    extra = sorted(set(shard) - {*required, "final"})
    if extra:
        raise ValueError(f"has unexpected tensor(s) {extra}")
    ids, mask, offsets, states = (shard[k] for k in required)
    for name in ("input_ids", "loss_mask", "offsets"):
        t = shard[name]
        if t.dtype not in _INTEGER or t.dim() != 1:
            raise ValueError(f"'{name}' must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    total = len(ids)
    if len(mask) != total:
        raise ValueError(f"'loss_mask' has {len(mask)} entries for {total} tokens")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != total or bool((offsets.diff() < 0).any()):
        raise ValueError(f"'offsets' must rise from 0 to the {total} tokens, got {offsets.tolist()[:8]}...")
    if total and int(ids.min()) < 0:
        raise ValueError(f"'input_ids' holds a negative token id ({int(ids.min())})")
    if total and vocab_size is not None and int(ids.max()) >= vocab_size:
        raise ValueError(f"'input_ids' holds token id {int(ids.max())}, outside the target's vocabulary "
                         f"of {vocab_size}")
    for name in ("states", "final"):
        if name not in shard:
            continue
        t = shard[name]
        if not t.is_floating_point() or t.dim() != 2 or len(t) != total:
            raise ValueError(f"'{name}' must be a floating [{total}, hidden] tensor, got {t.dtype} {tuple(t.shape)}")
        if t.shape != states.shape:
            raise ValueError(f"'{name}' has shape {tuple(t.shape)}, 'states' {tuple(states.shape)}")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"'{name}' holds {bad} NaN/Inf value(s)")

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
    """All sequences of the shards in a folder, each as (input_ids, loss_mask, states, final)."""

    def __init__(self, folder: str):
        self.files = sorted(glob.glob(os.path.join(folder, SHARD_GLOB)))
        if not self.files:
            raise ShardError(f"no training shards ({SHARD_GLOB}) in {folder}")
        self.sequences = []
        states = set()
        for file in self.files:
            try:
                with safe_open(file, "pt") as f:
                    states.add((f.metadata() or {}).get("state"))
                shard = load_file(file)
                offsets = shard["offsets"].tolist()
                for start, end in zip(offsets[:-1], offsets[1:]):
                    self.sequences.append({k: shard[k][start:end] for k in shard if k != "offsets"})
            except (SafetensorError, KeyError, OSError) as e:
                raise ShardError(f"training shard {file} is unreadable ({e})") from None
        if len(states) != 1 or None in states:
            raise ShardError(f"the shards in {folder} do not agree on the target state they hold: "
                             f"{sorted(map(str, states))}")
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

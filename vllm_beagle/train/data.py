"""From token sequences (prompts with the target's own responses) to training shards of target states."""

from __future__ import annotations

import os

import torch
from tqdm import tqdm

from ..reference import target_states
from ..schema import STATE_FINAL_NORM, BeagleConfig
from .shards import write_shard


@torch.no_grad()
def write_examples(target, cfg: BeagleConfig, sequences: list[tuple[list[int], list[bool]]], out_dir: str,
                   shard_size: int = 256, progress: bool = True) -> int:
    """Run the HF target over each (token ids, loss mask) and write the states the draft reads.

    Returns the number of shards written. Shards already on disk (whole, by construction) are kept:
    an interrupted run resumes at the first missing shard.
    """
    os.makedirs(out_dir, exist_ok=True)
    num_shards = -(-len(sequences) // shard_size)
    for shard in tqdm(range(num_shards), desc="target states", unit="shard", disable=not progress):
        path = os.path.join(out_dir, f"shard-{shard:05d}.safetensors")
        if os.path.exists(path):
            continue
        ids, masks, states, finals = [], [], [], []
        for tokens, loss_mask in sequences[shard * shard_size:(shard + 1) * shard_size]:
            tokens = torch.tensor(tokens)
            out = target_states(target, tokens, cfg)
            ids.append(tokens)
            masks.append(torch.tensor(loss_mask))
            states.append(out.states)
            finals.append(out.final)
        write_shard(path, ids, masks, states, finals if cfg.state != STATE_FINAL_NORM else None)
    return num_shards

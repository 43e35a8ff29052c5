"""A reduced draft vocabulary: the target tokens the draft most often has to predict in its training data."""

from __future__ import annotations

import torch

from .shards import ShardSet

# `beagle train`'s default, from benchmarks/draft_vocab.py on SmolLM2-135M (49,152 tokens; README): 8,192
# tokens drafted as well as any size from 4,096 to the full vocabulary, ran 0.89x against the full head's
# 0.74x end to end in vLLM and trained at a fifth of its step time; 4,096 was as fast but covered 93%.
DEFAULT_SIZE = 8192


def default_size(arch: str, vocab_size: int) -> int:
    """The draft vocabulary `beagle train` uses unless told (0: the full vocabulary). EAGLE-1 drafts over
    the full vocabulary; so does Beagle on a target with no more than DEFAULT_SIZE tokens."""
    return DEFAULT_SIZE if arch == "beagle" and vocab_size > DEFAULT_SIZE else 0


def token_counts(data: ShardSet, vocab_size: int) -> torch.Tensor:
    """How often each target token is a supervised prediction target in the data, [vocab_size]."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids, mask in data.tokens():
        ids, mask = ids.long(), mask.bool()
        # Row p predicts t_{p+2} where loss_mask[p + 1]: the targets are the t_j with loss_mask[j - 1].
        counts += torch.bincount(ids[1:][mask[:-1]], minlength=vocab_size)
    return counts


def draft_vocabulary(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The ids of the `size` most frequent tokens (ties to the lower id), in ascending order."""
    if not 0 < size <= len(counts):
        raise ValueError(f"a draft vocabulary must hold 1 to {len(counts)} tokens, got {size}")
    order = torch.argsort(counts, descending=True, stable=True)
    return order[:size].sort().values


def coverage(counts: torch.Tensor, token_ids: torch.Tensor) -> float:
    """The share of prediction targets that the draft vocabulary can express."""
    return float(counts[token_ids].sum() / counts.sum().clamp_min(1))

"""Held-out acceptance, computed offline: what greedy drafting of K tokens (chain or parallel, as the draft
drafts) would reach.

The held-out shards hold the target's own greedy responses, so the tokens that follow a position are
exactly what the target would verify there: drafting from the true context at a response position
and counting the longest matching prefix gives that round's accepted tokens without running the
target again. Rounds start at every `stride`-th response position, so tau here averages over start
positions rather than over the positions vLLM's rounds happen to start at; vLLM's own counters
(`beagle eval`) are the figure of record.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import is_beagle_checkpoint
from ..eagle import EagleDraft
from ..reference import Draft, ReferenceDraft, accepted_prefix
from .shards import ShardSet


def load_draft(path: str, target: torch.nn.Module) -> Draft:
    """A checkpoint folder as the trainer's draft for an HF target: Beagle, or the EAGLE-1 baseline."""
    cls = ReferenceDraft if is_beagle_checkpoint(path) else EagleDraft
    return cls.from_checkpoint(path, target).eval()


def offline_acceptance(draft: Draft, data: ShardSet, k: int, max_sequences: int = 16, stride: int = 8,
                       progress: bool = False, within: int | None = None) -> dict:
    """{"rounds", "per_position": rate at which draft position i (1..k) is accepted, "tau"}.

    within: only rounds that start among the first `within` response tokens. Long greedy responses of a
    small target grow repetitive and easy to draft, so this matches an evaluation that stops early.
    """
    return acceptance(accepted_per_round(proposer(draft, k), data, k, max_sequences, stride, progress, within), k)


def proposer(draft: Draft, k: int):
    """The draft's greedy proposal of k tokens as accepted_per_round asks for it."""
    dtype = draft.embed_weight.dtype
    return lambda tokens, states: draft.propose(tokens, states.to(dtype), k)[0]


def ngram_proposer(k: int):
    """propose(tokens, states) as vLLM's `method: ngram` drafts with the benchmarks' lookup lengths; a context
    without a match proposes nothing."""
    from ..drafts import NGRAM, speculative_config

    config = speculative_config(NGRAM, k)
    lo, hi = config["prompt_lookup_min"], config["prompt_lookup_max"]
    return lambda tokens, _states: prompt_lookup(tokens.numpy(), lo, hi, k)


def prompt_lookup(tokens: np.ndarray, shortest: int, longest: int, k: int) -> list[int]:
    """vLLM's n-gram proposal for one context: the longest n-gram of shortest..longest tokens that ends the
    context and occurred before, at its earliest occurrence, and up to k tokens after it. Written here
    rather than called: vLLM's own (numba) imports llvmlite, which breaks every later vLLM engine in the
    process (compare.run_engines); tests/test_eagle.py holds the two equal."""
    for n in range(longest, shortest - 1, -1):
        if len(tokens) > n:
            starts = np.flatnonzero((np.lib.stride_tricks.sliding_window_view(tokens[:-1], n) == tokens[-n:]).all(1))
            if len(starts):
                return tokens[starts[0] + n:starts[0] + n + k].tolist()
    return []


@torch.no_grad()
def accepted_per_round(propose, data: ShardSet, k: int, max_sequences: int = 16, stride: int = 8,
                       progress: bool = False, within: int | None = None) -> list[int]:
    """The draft tokens accepted in each round of `offline_acceptance`, for any proposer: propose(tokens,
    states) -> k token ids, from the context tokens t_0..t_n and the states of t_0..t_{n-1}."""
    accepted = []
    for seq in tqdm(data.sequences[:max_sequences], desc="held-out acceptance", unit="seq", disable=not progress):
        tokens = seq["input_ids"].long()
        response = seq["loss_mask"].bool()
        # Round at n: the newest token is t_n, the draft proposes t_{n+1}..t_{n+k}.
        starts = [n for n in range(1, len(tokens) - k) if response[n + 1]][::stride]
        if within is not None and starts:
            starts = [n for n in starts if n - starts[0] < within]
        for n in starts:
            drafts = propose(tokens[:n + 1], seq["states"][:n])
            accepted.append(accepted_prefix(drafts, tokens[n + 1:n + 1 + k].tolist()))
    return accepted


def acceptance(accepted: list[int], k: int) -> dict:
    """Rounds, per-position acceptance rates and tau of the accepted counts of rounds of K draft tokens."""
    rates = [sum(a > i for a in accepted) / len(accepted) if accepted else 0.0 for i in range(k)]
    return {"rounds": len(accepted), "per_position": rates, "tau": 1.0 + sum(rates)}


def versus(accepted: list[int], ngram: list[int], k: int) -> dict:
    """A draft's rounds split by whether n-gram drafting had a token accepted there (copying from the context
    would have paid), and the acceptance of the better of the two in each round."""
    pairs = list(zip(accepted, ngram, strict=True))
    return {"ngram_rounds": sum(1 for _, b in pairs if b),
            "where_ngram_accepts": acceptance([a for a, b in pairs if b], k),
            "elsewhere": acceptance([a for a, b in pairs if not b], k),
            "better_of_both": acceptance([max(a, b) for a, b in pairs], k)}

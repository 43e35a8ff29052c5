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

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


@torch.no_grad()
def offline_acceptance(draft: Draft, data: ShardSet, k: int, max_sequences: int = 16, stride: int = 8,
                       progress: bool = False, within: int | None = None) -> dict:
    """{"rounds", "per_position": rate at which draft position i (1..k) is accepted, "tau"}.

    within: only rounds that start among the first `within` response tokens. Long greedy responses of a
    small target grow repetitive and easy to draft, so this matches an evaluation that stops early.
    """
    accepted = [0] * k
    rounds = 0
    sequences = data.sequences[:max_sequences]
    for seq in tqdm(sequences, desc="held-out acceptance", unit="seq", disable=not progress):
        tokens = seq["input_ids"].long()
        states = seq["states"].to(draft.embed_weight.dtype)
        response = seq["loss_mask"].bool()
        # Round at n: the newest token is t_n, the draft proposes t_{n+1}..t_{n+k}.
        starts = [n for n in range(1, len(tokens) - k) if response[n + 1]][::stride]
        if within is not None and starts:
            starts = [n for n in starts if n - starts[0] < within]
        for n in starts:
            drafts, _ = draft.propose(tokens[:n + 1], states[:n], k)
            for i in range(accepted_prefix(drafts, tokens[n + 1:n + 1 + k].tolist())):
                accepted[i] += 1
            rounds += 1
    rates = [a / rounds for a in accepted] if rounds else [0.0] * k
    return {"rounds": rounds, "per_position": rates, "tau": 1.0 + sum(rates)}

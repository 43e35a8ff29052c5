"""The pure-PyTorch reference Beagle draft, the target states it reads, and greedy drafting (chain and parallel).

This is the model the trainer trains and the yardstick the vLLM model is held to: the same weights
and inputs must give the same draft tokens here and inside vLLM. No vLLM import.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .block import BeagleBlock, masked_attention
from .checkpoint import load_checkpoint, save_checkpoint
from .schema import BeagleConfig


class Draft(nn.Module):
    """What every draft the trainer trains shares: a trainable `block`, the target's frozen embedding
    and LM head, and the draft vocabulary (the target's, or a reduced one with its own LM head)."""

    arch: str

    def __init__(self, cfg: BeagleConfig, block: nn.Module, embed_weight: torch.Tensor,
                 lm_head_weight: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.block = block
        self.register_buffer("embed_weight", embed_weight.detach().clone(), persistent=False)
        self.register_buffer("lm_head_weight", lm_head_weight.detach().clone(), persistent=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(tokens, self.embed_weight)

    def combine(self, target_states: torch.Tensor) -> torch.Tensor:
        """The target's states as the draft's keys and values read them (vLLM's combine_hidden_states)."""
        return target_states

    def use_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Draft over these target tokens; the draft's LM head starts as the target's rows for them."""
        with torch.no_grad():
            self.block.draft_to_target.copy_(token_ids)
            self.block.lm_head.weight.copy_(self.lm_head_weight[token_ids])

    @property
    def target_rows(self) -> torch.Tensor:
        """The target's LM head rows of the draft vocabulary: the target's logits over what the draft predicts."""
        if self.cfg.draft_vocab_size is None:
            return self.lm_head_weight
        return self.lm_head_weight[self.block.draft_to_target]

    def draft_logits(self, predicted: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (what the trainer's loss reads)."""
        x = self.block.logits_input(predicted)
        return x @ self.lm_head_weight.T if self.cfg.draft_vocab_size is None else self.block.lm_head(x)

    def logits(self, predicted: torch.Tensor) -> torch.Tensor:
        """Logits over the target's vocabulary (what drafting takes the argmax of)."""
        logits = self.draft_logits(predicted)
        if self.cfg.draft_vocab_size is None:
            return logits
        return self.block.to_target_vocab(logits, self.cfg.vocab_size)

    def propose(self, tokens: torch.Tensor, states: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
        """The k tokens greedy drafting proposes as vLLM runs this draft, and the states ĥ behind them;
        arguments as draft_chain's."""
        return self.draft_chain(tokens, states, k)


class ReferenceDraft(Draft):
    """Beagle block + the target's (frozen) embedding and LM head, attention over a dense K/V set."""

    arch = "beagle"

    def __init__(self, cfg: BeagleConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor):
        super().__init__(cfg, BeagleBlock(cfg), embed_weight, lm_head_weight)

    @classmethod
    def from_checkpoint(cls, path: str, target: nn.Module) -> ReferenceDraft:
        """Load a checkpoint for an HF target model; embedding and LM head are the target's unless the checkpoint
        has its own (a reduced-vocabulary draft always has its own LM head, which belongs to the block)."""
        cfg, tensors = load_checkpoint(path, target.config.to_dict(), getattr(target.config, "_name_or_path", "target"))
        embed = tensors.pop("embed_tokens.weight", None)
        lm_head = tensors.pop("lm_head.weight", None) if cfg.draft_vocab_size is None else None
        draft = cls(
            cfg,
            target.get_input_embeddings().weight if embed is None else embed,
            target.get_output_embeddings().weight if lm_head is None else lm_head,
        )
        draft.block.load_state_dict(tensors)
        return draft.to(target.dtype)

    def combine(self, target_states: torch.Tensor) -> torch.Tensor:
        return self.block.combine(target_states)

    def save(self, path: str) -> None:
        """The checkpoint holds the block only; embedding and LM head come from the target when served."""
        save_checkpoint(path, self.cfg, self.block.state_dict())

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, states: torch.Tensor,
                state_positions: torch.Tensor, visible: torch.Tensor | None = None,
                row_states: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted states ĥ for query rows.

        tokens/positions: [..., T], row p's token t_{p+1} and p; states/state_positions: [..., S, H] and
        [..., S], states as the block reads them (the target's through `combine`, or predicted ones).
        visible: [..., T, S]; by default the causal rule `state position <= row position`. row_states:
        [..., T, H], each row's own state as the block reads it, which a token+state query needs.
        """
        if visible is None:
            visible = state_positions.unsqueeze(-2) <= positions.unsqueeze(-1)
        rows = self.block.row_input(self.embed(tokens), row_states)
        q = self.block.queries(rows, positions)
        k, v = self.block.keys_values(states, state_positions)
        return self.block.output(rows, masked_attention(q, k, v, visible))

    def propose(self, tokens: torch.Tensor, states: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
        if self.cfg.drafting == "parallel":
            return self.draft_parallel(tokens, states, k)
        return self.draft_chain(tokens, states, k)

    @torch.no_grad()
    def draft_parallel(self, tokens: torch.Tensor, states: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
        """Greedy parallel drafting as vLLM's parallel drafter runs it: one forward over k rows. The first
        carries the newest token and the last true state; the k - 1 after it carry the mask token and the
        learned `mask_hidden` as their state, at their own positions, all attending causally."""
        n = states.shape[0]
        mask_states = self.block.combine(self.block.mask_hidden).expand(k - 1, -1)
        keys = torch.cat([self.combine(states), mask_states.to(states.dtype)])
        rows = torch.arange(n - 1, n + k - 1)
        row_tokens = torch.cat([tokens[n:n + 1], torch.full((k - 1,), self.cfg.mask_token_id)])
        predicted = self(row_tokens, rows, keys, torch.arange(len(keys)), row_states=keys[rows])
        return self.logits(predicted).argmax(-1).tolist(), predicted

    @torch.no_grad()
    def draft_chain(self, tokens: torch.Tensor, states: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
        """Greedy chain drafting as vLLM does it: the k draft tokens and the k states ĥ behind them.

        tokens: t_0..t_n, the sequence so far including the newest token; states: the target's states
        h_0..h_{n-1} as `target_states` returns them. Drafts tokens for positions n+1..n+k. Each step's row
        sits one position further on; in concat mode its key/value set also gains the ĥ the previous step predicted, in
        true_states mode it keeps the true states only.
        """
        n = states.shape[0]
        states = self.combine(states)
        positions = torch.arange(n)
        predicted = [self(tokens[n:n + 1], positions[-1:], states, positions, row_states=states[-1:])[-1]]
        drafts = [int(self.logits(predicted[-1]).argmax())]
        for step in range(1, k):
            # The row of a draft step carries the ĥ of the step before, as its own state and (concat) as a key.
            fed_back = predicted[-1][None]
            if self.cfg.kv_mode == "concat":
                states = torch.cat([states, fed_back])
            row = torch.tensor([n - 1 + step])
            predicted.append(self(torch.tensor([drafts[-1]]), row, states, torch.arange(len(states)),
                                  row_states=fed_back)[-1])
            drafts.append(int(self.logits(predicted[-1]).argmax()))
        return drafts, torch.stack(predicted)


class TargetOutput(NamedTuple):
    states: torch.Tensor  # what the draft reads
    final: torch.Tensor  # the final post-norm states (equal to `states` for method eagle)
    logits: torch.Tensor | None


@torch.no_grad()
def target_states(target: nn.Module, ids: torch.Tensor, cfg: BeagleConfig, logits: bool = True) -> TargetOutput:
    """The states, final states and (unless `logits` is False) logits of an HF causal LM over `ids` ([T] or
    [B, T]). Without logits, extraction skips the LM head and its [T, vocab] tensor: about a quarter of
    SmolLM2-135M's time per sequence.

    final_norm: the draft reads the last, post-norm hidden state (vLLM `method: eagle`). layer l: the
    pre-norm residual after decoder layer l-1, l = 0 being the embedding output (vLLM `method: eagle3`
    aux ids); fused: those of several layers, concatenated in the order of `cfg.state_layers`, as vLLM
    concatenates its aux states.
    """
    batched = ids.dim() == 2
    ids = ids if batched else ids[None]
    captured = {}
    hooks = []
    for layer in dict.fromkeys(cfg.aux_layers):
        module = target.get_input_embeddings() if layer == 0 else target.model.layers[layer - 1]
        hooks.append(module.register_forward_hook(
            lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out[0] if isinstance(out, tuple) else out)))
    try:
        final = target.model(input_ids=ids).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    states = torch.cat([captured[layer] for layer in cfg.aux_layers], dim=-1) if cfg.aux_layers else final
    out = TargetOutput(states, final, target.lm_head(final) if logits else None)
    return out if batched else TargetOutput(*(None if t is None else t[0] for t in out))


def accepted_prefix(drafts: list[int], verified: list[int]) -> int:
    """How many draft tokens greedy verification accepts: the length of the prefix that matches."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == verified[accepted]:
        accepted += 1
    return accepted


@torch.no_grad()
def simulate_greedy(target: nn.Module, draft: Draft, prompt: list[int], max_tokens: int,
                    k: int) -> dict:
    """Greedy speculative decoding of one request, as vLLM's V1 engine runs it with K = k.

    Each round drafts k tokens from the last verified state, accepts the longest prefix that matches
    the target's greedy tokens, and emits those plus one token from the target. Returns the output
    tokens, the counters vLLM reports (drafts, draft tokens, accepted, accepted per position) and the
    draft tokens of every round ("drafts").
    """
    seq = list(prompt)
    states, _, logits = target_states(target, torch.tensor(seq), draft.cfg)
    seq.append(int(logits[-1].argmax()))
    stats = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "accepted_per_pos": [0] * k,
             "drafts": []}
    while len(seq) - len(prompt) < max_tokens:
        drafts, _ = draft.propose(torch.tensor(seq), states, k)
        states, _, logits = target_states(target, torch.tensor(seq + drafts), draft.cfg)
        greedy = logits[len(seq) - 1:].argmax(-1).tolist()
        accepted = accepted_prefix(drafts, greedy)
        stats["drafts"].append(drafts)
        stats["num_drafts"] += 1
        stats["num_draft_tokens"] += k
        stats["num_accepted_tokens"] += accepted
        for i in range(accepted):
            stats["accepted_per_pos"][i] += 1
        seq += greedy[:accepted + 1]
        states = states[:len(seq) - 1]
    stats["output"] = seq[len(prompt):len(prompt) + max_tokens]
    return stats


"""The EAGLE-1 baseline: the draft vLLM's built-in `method: eagle` runs, in a form the trainer trains.

Trained by the same trainer on the same data and budget as Beagle, so that every comparison is like
for like; exported in the format vLLM's `EagleLlamaForCausalLM` loads (llama_eagle.py), not through
the plugin. vLLM feeds it as it feeds a Beagle draft for method eagle: row p carries the token
t_{p+1}, the target's final post-norm state h_p and the position p. The row fuses the two,
`x = fc([e(t_{p+1}); h_p])`, then runs one Llama decoder layer without its input norm (causal
self-attention over the rows, RoPE at p) and adds the residual without a final norm: the output ĥ
predicts the state at position p + 1, and the target's LM head reads it directly.
"""

from __future__ import annotations

import torch
from torch import nn

from .block import AttentionProjections, GatedMLP, RMSNorm, Rotary, masked_attention
from .checkpoint import read_config_dict, read_tensors, write_checkpoint
from .reference import Draft
from .schema import STATE_FINAL_NORM, BeagleConfig
from .verifier import verifier_of


class SelfAttention(AttentionProjections):
    def __init__(self, cfg: BeagleConfig):
        super().__init__()
        self.add_projections(cfg)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BeagleConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)


class EagleBlock(nn.Module):
    """The trainable part; its state_dict names are the tensor names of vLLM's EAGLE-1 checkpoints."""

    def __init__(self, cfg: BeagleConfig):
        super().__init__()
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList([DecoderLayer(cfg)])
        self.rotary = Rotary(cfg)

    def forward(self, embeds: torch.Tensor, states: torch.Tensor, positions: torch.Tensor,
                visible: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Outputs of all rows, or of the `last` rows only (every row still gives its key and value)."""
        layer = self.layers[0]
        attn = layer.self_attn
        x = self.fc(torch.cat([embeds, states.to(embeds.dtype)], dim=-1))
        k, v = attn.project_keys(x), attn.project_values(x)
        if last is not None:
            x, visible = x[..., -last:, :], visible[..., -last:, :]
        q = attn.project_queries(x)
        q_positions = positions if last is None else positions[..., -last:]
        out = masked_attention(self.rotary(q, q_positions), self.rotary(k, positions), v, visible)
        y = x + attn.o_proj(out)
        return y + layer.mlp(layer.post_attention_layernorm(y))

    def logits_input(self, predicted: torch.Tensor) -> torch.Tensor:
        return predicted


class EagleDraft(Draft):
    arch = "eagle"

    def __init__(self, cfg: BeagleConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor):
        if cfg.state != STATE_FINAL_NORM or cfg.draft_vocab_size is not None:
            raise ValueError("vLLM's EAGLE-1 reads the target's final state and drafts over the full vocabulary")
        super().__init__(cfg, EagleBlock(cfg), embed_weight, lm_head_weight)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, states: torch.Tensor,
                visible: torch.Tensor | None = None, last: int | None = None) -> torch.Tensor:
        """Predicted states for rows (token t_{p+1}, state h_p, position p); causal over rows by default."""
        if visible is None:
            visible = positions.unsqueeze(-1) >= positions.unsqueeze(-2)
        return self.block(self.embed(tokens), states, positions, visible, last)

    @torch.no_grad()
    def draft_chain(self, tokens: torch.Tensor, states: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
        """Greedy chain drafting as vLLM runs EAGLE-1: each step adds a row (draft token, predicted state)."""
        n = states.shape[0]
        row_tokens, predicted, drafts = tokens[1:n + 1], [], []
        for _ in range(k):
            out = self(row_tokens, torch.arange(len(row_tokens)), states, last=1)[-1]
            predicted.append(out)
            drafts.append(int(self.logits(out).argmax()))
            row_tokens = torch.cat([row_tokens, torch.tensor([drafts[-1]])])
            states = torch.cat([states, out[None]])
        return drafts, torch.stack(predicted)

    def save(self, path: str) -> None:
        """vLLM's EAGLE-1 format: the target's config with one layer, tensors without a `model.` prefix."""
        write_checkpoint(path, eagle_hf_config(self.cfg), self.block.state_dict())

    @classmethod
    def from_checkpoint(cls, path: str, target: nn.Module) -> EagleDraft:
        d = read_config_dict(path)
        cfg = BeagleConfig.from_target(d, verifier=verifier_of(d), training=d.get("training", {}))
        draft = cls(cfg, target.get_input_embeddings().weight, target.get_output_embeddings().weight)
        draft.block.load_state_dict(read_tensors(path))
        return draft.to(target.dtype)


def eagle_hf_config(cfg: BeagleConfig) -> dict:
    """A one-layer Llama config that vLLM reads as an EAGLE-1 draft; training facts under `training`."""
    beagle = cfg.to_hf_dict()
    d = {k: v for k, v in beagle.items() if k != "beagle"}
    d["architectures"] = ["LlamaForCausalLM"]
    d["training"] = cfg.training
    return d


"""The Beagle block's math, defined once for the reference model, the trainer and the vLLM model.

Everything but the attention itself lives here; each caller supplies attention over its own K/V
store: masked SDPA in the reference and the trainer (or FlexAttention, the trainer's block-sparse
option), vLLM's paged `Attention` in vLLM.

The one convention (DESIGN.md section 1.1), in vLLM's row layout: row `p` carries the state `h_p`
(the target's, or the draft's own prediction) and the token `t_{p+1}`.
  - keys/values of row `p` come from `h_p`, RoPE at position `p`;
  - the query of row `p` comes from its row input `x_p`, RoPE at position `p + 1` (its token's position):
    `x_p = e(t_{p+1})` (query "token", the paper's), or `e(t_{p+1}) + row_proj(row_norm(h_p))` (query
    "token+state": the row's own state too, the target's or the ĥ a draft step feeds back);
  - row `p` attends to rows `<= p`, which is Beagle's strict mask `j < i` for the token at `i = p+1`;
  - the row's output `ĥ = y + MLP(y)`, `y = x_p + o_proj(attention)`, is the predicted state at position
    `p + 1`; `LMHead(ĥ)` predicts `t_{p+2}`; `ĥ` is also what the next draft step feeds back as the state
    of its row.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .schema import DRAFT_TO_TARGET, MASK_HIDDEN, QUERY_TOKEN_STATE, STATE_FINAL_NORM, STATE_FUSED, BeagleConfig

# The query's token sits one position after the state of its row.
QUERY_POSITION_OFFSET = 1


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 as Llama targets do, so that the draft sees the target's numbers in any dtype.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Rotary(nn.Module):
    """Neox-style rotary embedding (Llama's), with the target's RoPE type and parameters."""

    def __init__(self, cfg: BeagleConfig):
        super().__init__()
        inv_freq, self.scaling = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [..., T, heads, head_dim]; positions: [..., T]."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(-2)
        cos, sin = emb.cos() * self.scaling, emb.sin() * self.scaling
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)


def rope_inv_freq(cfg: BeagleConfig) -> tuple[torch.Tensor, float]:
    params = cfg.rope_parameters
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        exponent = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
        return 1.0 / (params["rope_theta"] ** exponent), 1.0
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(f"RoPE type {rope_type!r} depends on the sequence length; Beagle supports static types only")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown RoPE type {rope_type!r}")
    llama = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                        rope_parameters=dict(params))
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](llama, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AttentionProjections(nn.Module):
    """The q, k, v and o projections of one attention layer with the target's head layout (GQA), for the
    Beagle block and the EAGLE-1 baseline's self-attention alike; `q_proj`, `k_proj`, `v_proj` and `o_proj`
    are the tensor names of both checkpoint formats."""

    def add_projections(self, cfg: BeagleConfig) -> None:
        # Called by the subclass, not from __init__: the Beagle block registers its two norms before the
        # projections, and the order of parameters is the order of a saved optimizer state.
        H, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(H, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(H, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(H, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, H, bias=False)

    def project_queries(self, x: torch.Tensor) -> torch.Tensor:
        """[..., T, H] -> [..., T, heads, head_dim]."""
        return self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))

    def project_keys(self, x: torch.Tensor) -> torch.Tensor:
        """[..., T, H] -> [..., T, kv_heads, head_dim]."""
        return self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))

    def project_values(self, x: torch.Tensor) -> torch.Tensor:
        """[..., T, H] -> [..., T, kv_heads, head_dim]."""
        return self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))


class BeagleBlock(AttentionProjections):
    """One cross-attention block with an MLP; parameter names are the checkpoint's tensor names."""

    def __init__(self, cfg: BeagleConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.query_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.state_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.add_projections(cfg)
        self.mlp_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.mlp = GatedMLP(H, cfg.intermediate_size)
        self.final_norm = None if cfg.state == STATE_FINAL_NORM else RMSNorm(H, cfg.rms_norm_eps)
        # The fused kind reads several layers' residuals through one learned projection (EAGLE-3's fc).
        self.fc = nn.Linear(cfg.state_width, H, bias=False) if cfg.state == STATE_FUSED else None
        self.row_proj = None
        if cfg.query == QUERY_TOKEN_STATE:
            self.row_norm = RMSNorm(H, cfg.rms_norm_eps)
            self.row_proj = nn.Linear(H, H, bias=False)
            # Zero: training starts from the paper's block and adds as much of the row's state as helps.
            nn.init.zeros_(self.row_proj.weight)
        self.rotary = Rotary(cfg)
        if cfg.drafting == "parallel":
            # The state of a parallel draft's mask rows, as the target's states come (combine applies):
            # unit scale, like the states the state norm sees, so that its gradient is of their size too.
            self.register_parameter(MASK_HIDDEN, nn.Parameter(torch.randn(cfg.state_width)))
        if cfg.draft_vocab_size is not None:
            # The draft's own LM head over a reduced vocabulary and the target id of each of its rows.
            self.lm_head = nn.Linear(H, cfg.draft_vocab_size, bias=False)
            self.register_buffer(DRAFT_TO_TARGET, torch.arange(cfg.draft_vocab_size))

    def combine(self, target_states: torch.Tensor) -> torch.Tensor:
        """The target's states as the block reads them: [..., state_width] -> [..., H]. Only states that
        come from the target pass through here; the block's own predictions ĥ are already in this space."""
        return target_states if self.fc is None else self.fc(target_states)

    def row_input(self, embeds: torch.Tensor, row_states: torch.Tensor | None) -> torch.Tensor:
        """[..., T, H] what the rows' queries and residuals start from: their tokens' embeddings, plus (query
        "token+state") the projection of each row's own state as the keys read it (`combine`d, or a ĥ)."""
        if self.row_proj is None:
            return embeds
        if row_states is None:
            raise ValueError("a token+state query needs the state of every row")
        return embeds + self.row_proj(self.row_norm(row_states.to(embeds.dtype)))

    def queries(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[..., T, H] row inputs -> [..., T, heads, head_dim] rotated queries."""
        q = self.project_queries(self.query_norm(rows))
        return self.rotary(q, positions + QUERY_POSITION_OFFSET)

    def keys_values(self, states: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., T, H] states of the rows -> rotated keys and values, [..., T, kv_heads, head_dim]."""
        x = self.state_norm(states)
        return self.rotary(self.project_keys(x), positions), self.project_values(x)

    def output(self, rows: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual on the row input, then the MLP: the predicted state ĥ. attn: [..., T, heads*hd]."""
        y = rows + self.o_proj(attn)
        return y + self.mlp(self.mlp_norm(y))

    def logits_input(self, predicted: torch.Tensor) -> torch.Tensor:
        """What the LM head reads: ĥ itself for a post-norm state, the final norm of ĥ for a pre-norm one."""
        return predicted if self.final_norm is None else self.final_norm(predicted)

    def to_target_vocab(self, draft_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Logits over the reduced draft vocabulary -> the target's vocabulary, -inf where never drafted."""
        full = draft_logits.new_full((*draft_logits.shape[:-1], vocab_size), float("-inf"))
        return full.index_copy_(-1, getattr(self, DRAFT_TO_TARGET), draft_logits)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible) -> torch.Tensor:
    """Attention with an explicit visibility mask, GQA by head grouping.

    q: [..., T, heads, d]; k, v: [..., S, kv_heads, d]. visible: [..., T, S] bool (SDPA), or a
    FlexAttention BlockMask over [T, S] with q, k, v of shape [B, T or S, heads, d] (the trainer's
    block-sparse path). Returns [..., T, heads*d]. Every row must see at least one key.
    """
    q, k, v = (x.transpose(-3, -2) for x in (q, k, v))
    gqa = q.shape[-3] != k.shape[-3]
    if isinstance(visible, torch.Tensor):
        # As many dims as q: SDPA's fused CPU kernel takes a 2-D or 4-D mask only; given [1, T, S] it falls
        # back to the math path, which materialises every score (training steps ran up to 1.4 times slower).
        mask = visible.unsqueeze(-3)
        mask = mask.view((1,) * (q.dim() - mask.dim()) + mask.shape)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    else:
        out = _flex_attention()(q, k, v, block_mask=visible, enable_gqa=gqa)
    return out.transpose(-3, -2).flatten(-2)


@functools.cache
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled, FlexAttention runs its reference path, which materialises every score.
    return torch.compile(flex_attention)

"""A tiny Llama target and drafts for it (Beagle, and the EAGLE-1 baseline), built from nothing in seconds.

Tests and the demo need a target with real saved weights (vLLM's dummy loader makes acceptance
meaningless) and a draft that is right often but not always, so that acceptance can tell
conventions apart. No model hub is needed: the tokenizer is the Llama-compatible SentencePiece
model that vLLM's dependency mistral_common ships.

The target's embeddings are large next to what its layers add, so its next token is mostly a
function of the current token plus a context-dependent nudge. A Beagle draft with identity-like
weights then predicts the "mostly" part, and its random attention over the states adds a
context-dependent nudge of its own: partly right, and sensitive to which states and positions it
attends to.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from .eagle import EagleDraft
from .reference import ReferenceDraft
from .schema import QUERY_TOKEN, STATE_FINAL_NORM, BeagleConfig, state_fields

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_target(out: str, seed: int = 0, hidden: int = 128, layers: int = 2, heads: int = 4,
                 kv_heads: int = 2, intermediate: int = 256, embed_std: float = 1.0) -> str:
    """Save a random Llama (fp32 safetensors, tokenizer, chat template) to `out`."""
    import mistral_common
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    sp = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(sp, os.path.join(d, "tokenizer.model"))
        tok = LlamaTokenizer.from_pretrained(d)
    tok.pad_token = tok.unk_token
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, embed_std)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _random_init(block: torch.nn.Module, gen: torch.Generator, attn_std: float, out_std: float,
                 mlp_std: float, row_std: float = 0.0) -> None:
    """Random weights, small where they write into the residual so that a row's output stays near its
    token's embedding; norm weights stay 1."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("norm.weight"):
                continue
            std = (out_std if name.endswith("o_proj.weight") else mlp_std if "mlp." in name
                   else row_std if name == "row_proj.weight" else attn_std)
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_draft(target, out: str | None = None, seed: int = 0, state: str = STATE_FINAL_NORM,
                kv_mode: str = "concat", attn_std: float = 0.3, out_std: float = 0.004,
                mlp_std: float = 0.02, draft_vocab: torch.Tensor | None = None,
                verifier: str | None = None, drafting: str = "chain", query: str = QUERY_TOKEN,
                row_std: float = 0.02) -> ReferenceDraft:
    """A Beagle draft for an HF target model: near-identity (ĥ ≈ e(t)) plus random attention.

    `state` names the target state it reads (schema.state_name): final_norm (method eagle), layer:L or
    fused:A,B,... (method eagle3). `draft_vocab`: the target ids of a reduced draft vocabulary. `verifier`:
    the target `vllm serve DRAFT` serves it with (verifier.py). `drafting` parallel: mask rows carry the
    vocabulary's last token. `query` token+state: the rows' own states reach their queries through a random
    projection of std `row_std`. Saved to `out` when given.
    """
    beagle = state_fields(state, target.config.num_hidden_layers)
    beagle.update(kv_mode=kv_mode, query=query)
    if drafting == "parallel":
        beagle.update(drafting=drafting, mask_token_id=target.config.vocab_size - 1)
    if draft_vocab is not None:
        beagle["draft_vocab_size"] = len(draft_vocab)
    cfg = BeagleConfig.from_target(target.config.to_dict(), verifier=verifier, **beagle)
    draft = ReferenceDraft(cfg, target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    _random_init(draft.block, torch.Generator().manual_seed(seed), attn_std, out_std, mlp_std, row_std)
    if draft.block.final_norm is not None:
        with torch.no_grad():
            draft.block.final_norm.weight.copy_(target.model.norm.weight)
    if draft_vocab is not None:
        draft.use_draft_vocab(draft_vocab)
    if out is not None:
        draft.save(out)
    return draft


def build_eagle_draft(target, out: str | None = None, seed: int = 0, attn_std: float = 0.3, out_std: float = 0.004,
                      mlp_std: float = 0.02, state_std: float = 0.02) -> EagleDraft:
    """An EAGLE-1 baseline for an HF target model, near-identity like build_draft: the fusion layer passes the
    token embedding through and mixes a little of the state in. Saved (vLLM's EAGLE format) to `out` when given."""
    cfg = BeagleConfig.from_target(target.config.to_dict())
    draft = EagleDraft(cfg, target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    gen = torch.Generator().manual_seed(seed)
    _random_init(draft.block, gen, attn_std, out_std, mlp_std)
    H = cfg.hidden_size
    with torch.no_grad():
        draft.block.fc.weight.copy_(torch.cat([torch.eye(H), torch.randn(H, H, generator=gen) * state_std], dim=1))
    if out is not None:
        draft.save(out)
    return draft

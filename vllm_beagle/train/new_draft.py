"""A fresh draft for a target and its training shards: the architecture, the state the shards hold, and
the draft vocabulary, checked against each other before any training starts."""

from __future__ import annotations

import torch
from torch import nn

from ..eagle import EagleDraft
from ..reference import Draft, ReferenceDraft
from ..schema import QUERY_TOKEN, STATE_FINAL_NORM, BeagleConfig, state_fields
from .draft_vocab import coverage, draft_vocabulary, token_counts
from .shards import ShardSet


def check_options(arch: str, kv_mode: str, draft_vocab: int, drafting: str = "chain",
                  mask_token_id: int | None = None, query: str = QUERY_TOKEN) -> None:
    """ValueError for options that contradict each other, before anything is loaded."""
    if arch == "eagle" and (draft_vocab or kv_mode != "concat" or drafting != "chain" or query != QUERY_TOKEN):
        raise ValueError("--arch eagle is vLLM's EAGLE-1, which drafts a chain over the full vocabulary "
                         "with its own attention: --draft-vocab, --kv-mode, --drafting and --query do not apply")
    if drafting == "parallel" and kv_mode != "concat":
        raise ValueError("--drafting parallel needs --kv-mode concat: vLLM's mask rows attend to the "
                         "placeholder states of the rows before them")
    if mask_token_id is not None and drafting != "parallel":
        raise ValueError("--mask-token-id is the token of parallel drafting's mask rows: it needs --drafting parallel")


def new_draft(target: nn.Module, data: ShardSet, arch: str = "beagle", kv_mode: str = "concat",
              draft_vocab: int = 0, seed: int = 0, drafting: str = "chain",
              mask_token_id: int | None = None, query: str = QUERY_TOKEN) -> tuple[Draft, dict]:
    """(draft, facts for the checkpoint's training record), its weights drawn from `seed`. A parallel draft's
    mask token defaults to the last id of the vocabulary (a BPE vocabulary's rarest merge, or a reserved
    token). ValueError names what does not fit."""
    check_options(arch, kv_mode, draft_vocab, drafting, mask_token_id, query)
    state = state_fields(data.state, target.config.num_hidden_layers)
    if arch == "eagle" and state != {"state": STATE_FINAL_NORM}:
        raise ValueError(f"--arch eagle reads the target's final state, but the shards in {data.folder} hold "
                         f"{data.state}; make them with beagle data --state final_norm")
    if drafting == "parallel" and mask_token_id is None:
        mask_token_id = target.config.vocab_size - 1
    cfg = BeagleConfig.from_target(target.config.to_dict(), kv_mode=kv_mode, draft_vocab_size=draft_vocab or None,
                                   drafting=drafting, mask_token_id=mask_token_id, query=query,
                                   **state)
    if data.state_width != cfg.state_width:
        raise ValueError(f"the shards in {data.folder} hold {data.state} states of width {data.state_width}, but "
                         f"the target {getattr(target.config, '_name_or_path', '')} gives {cfg.state_width}")
    cls = EagleDraft if arch == "eagle" else ReferenceDraft
    torch.manual_seed(seed)
    draft = cls(cfg, target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    if getattr(draft.block, "final_norm", None) is not None:
        with torch.no_grad():  # a pre-norm draft's LM head starts reading its states as the target's does
            draft.block.final_norm.weight.copy_(target.model.norm.weight)
    facts = {}
    if draft_vocab:
        counts = token_counts(data, cfg.vocab_size)
        ids = draft_vocabulary(counts, draft_vocab)
        draft.use_draft_vocab(ids)
        facts["draft_vocab_coverage"] = round(coverage(counts, ids), 4)
    return draft, facts

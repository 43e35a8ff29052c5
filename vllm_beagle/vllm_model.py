"""The Beagle draft as a vLLM model, run by vLLM's EAGLE proposer (tested with the V1 model runner).

vLLM's EAGLE loop hands row p the token t_{p+1}, the state h_p and the position p (see block.py);
under that shift Beagle's strict cross-attention mask is vLLM's ordinary causal mask, so in concat mode
the draft's one attention layer is a stock paged `Attention` whose K/V come from states and whose
queries come from token embeddings. Later draft steps write K/V of the draft's own ĥ and the next
verification overwrites them with true states. In true-states mode the layer is the plugin's
`StateAttention`, which writes K/V from the states with one fused kernel and never lets a draft step
see the K/V that earlier steps wrote.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import maybe_prefix

from .attention import StateAttention
from .block import BeagleBlock
from .checkpoint import check_tensors, load_checkpoint
from .schema import BeagleConfig, CheckpointError, check_against_target
from .vllm_internals import Eagle3LlamaForCausalLM, EAGLEConfig


def beagle_config_from_vllm(vllm_config: VllmConfig) -> tuple[BeagleConfig, str]:
    """The draft's BeagleConfig, checked against the target and the speculative method vLLM chose."""
    spec = vllm_config.speculative_config
    draft_model_config = spec.draft_model_config
    checkpoint = draft_model_config.model
    hf = draft_model_config.hf_config
    hf = hf.model if isinstance(hf, EAGLEConfig) else hf
    cfg = BeagleConfig.from_hf_dict(hf.to_dict(), checkpoint)
    if spec.method != cfg.method:
        raise CheckpointError(
            checkpoint,
            f"the draft reads the target's {cfg.state!r} state, which vLLM feeds with speculative method "
            f"{cfg.method!r}, but the method is {spec.method!r}. Pass \"method\": \"{cfg.method}\" in "
            f"--speculative-config (or --spec-method {cfg.method}); vLLM guesses the method from the folder "
            "name only when it contains 'eagle-' or 'eagle3'.",
        )
    if cfg.drafting == "parallel" and not spec.parallel_drafting:
        # The other way round vLLM refuses by itself: a chain draft has no mask_token_id for its parallel drafter.
        raise CheckpointError(
            checkpoint,
            "the draft drafts in parallel (one forward per round), which needs vLLM's parallel drafting; pass "
            "\"parallel_drafting\": true in --speculative-config (beagle serve sets it from the checkpoint).",
        )
    if cfg.kv_mode == "true_states" and vllm_config.use_v2_model_runner:
        # V2 builds draft-step metadata with the backend's plain build(), so the backend could not
        # tell a draft step from the first pass, and draft steps would see the draft's own K/V.
        raise CheckpointError(
            checkpoint,
            "kv_mode 'true_states' needs vLLM's V1 model runner, which tells the draft's attention backend "
            "which draft step it runs; set VLLM_USE_V2_MODEL_RUNNER=0.",
        )
    target = vllm_config.model_config
    check_against_target(cfg, target.hf_config.to_dict(), checkpoint, target.model,
                         target.get_total_num_hidden_layers())
    if os.path.isdir(checkpoint):
        # Read and check every tensor now, so that a bad file is refused with a message that names
        # it, before vLLM's loader trips over it.
        load_checkpoint(checkpoint)
    return cfg, checkpoint


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "hidden_states": 0})
class BeagleDraftModel(nn.Module):
    """Embedding, the Beagle block and its paged attention layer: vLLM's `draft.model`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", cfg: BeagleConfig, start_layer_id: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.block = BeagleBlock(cfg)
        # Named as a layer after the target's so that it gets its own KV cache in the target's group.
        # Concat mode is plain causal attention, which vLLM's own backends do best; true-states mode
        # needs the plugin's backend, whose layer writes the cache from the states itself.
        self.states_in = cfg.kv_mode == "true_states"
        layer = StateAttention if self.states_in else Attention
        self.attn = layer(cfg.num_attention_heads, cfg.head_dim, cfg.head_dim ** -0.5,
                          num_kv_heads=cfg.num_key_value_heads, cache_config=vllm_config.cache_config,
                          prefix=f"{prefix}.layers.{start_layer_id}.self_attn.attn")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden_states[p] is row p's own state: the target's (combined) in the first pass, the ĥ fed back after.
        rows = self.block.row_input(self.embed_tokens(input_ids), hidden_states)
        q = self.block.queries(rows, positions).flatten(-2)
        if self.states_in:
            attn = self.attn(q, hidden_states, positions, self.block)
        else:
            k, v = self.block.keys_values(hidden_states, positions)
            attn = self.attn(q, k.flatten(-2), v.flatten(-2))
        predicted = self.block.output(rows, attn)
        return self.block.logits_input(predicted), predicted


class EagleBeagleLlamaForCausalLM(nn.Module):
    """Beagle draft for `method: eagle` (the target's final, post-norm state)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        cfg, self.checkpoint = beagle_config_from_vllm(vllm_config)
        self.beagle_config = cfg
        self.config = vllm_config.speculative_config.draft_model_config.hf_config
        self.model = BeagleDraftModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                      cfg=cfg, start_layer_id=vllm_config.model_config.get_total_num_hidden_layers())
        # The LM head over the vocabulary the draft predicts: the target's, or the draft's own reduced one.
        # A vLLM layer rather than the block's nn.Linear, so that it runs vLLM's GEMM (on CPU oneDNN's,
        # 3 times faster there than F.linear for an 8k x 576 head).
        head_rows = cfg.draft_vocab_size or cfg.vocab_size
        self.lm_head = ParallelLMHead(head_rows, cfg.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(head_rows)
        if cfg.draft_vocab_size is not None:
            del self.model.block.lm_head  # its weight loads into self.lm_head
        # vLLM replaces the embedding and LM head with the target's unless the checkpoint had its own.
        self.has_own_embed_tokens = False
        self.has_own_lm_head = False

    @property
    def mask_hidden(self) -> torch.Tensor:
        """A parallel draft's placeholder state, which vLLM's parallel drafter copies once the weights are loaded
        (through combine_hidden_states for eagle3) and feeds as the state of every mask row."""
        return self.model.block.mask_hidden

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs_embeds is not None:
            raise NotImplementedError("Beagle drafts take token ids, not input embeddings")
        return self.model(input_ids, positions, hidden_states)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.lm_head, hidden_states)
        if self.beagle_config.draft_vocab_size is None or logits is None:
            return logits
        # Logits over the draft vocabulary, returned in the target's: the rejection sampler and the
        # metrics see ordinary logits, and a token outside the draft vocabulary is never drafted.
        return self.model.block.to_target_vocab(logits, self.beagle_config.vocab_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tensors = dict(weights)
        check_tensors(self.beagle_config, tensors, self.checkpoint)
        block = self.model.block.state_dict(keep_vars=True)
        for name, tensor in tensors.items():
            if name == "embed_tokens.weight":
                self.has_own_embed_tokens = True
                param = self.model.embed_tokens.weight
            elif name == "lm_head.weight":
                self.has_own_lm_head = True
                param = self.lm_head.weight
            else:
                param = block[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)


class Eagle3BeagleLlamaForCausalLM(EagleBeagleLlamaForCausalLM, Eagle3LlamaForCausalLM):
    """Beagle draft for `method: eagle3`: K/V from the pre-norm residuals after chosen target layers, one
    layer's as it is or several layers' through the block's `fc` (the fused kind).

    It derives from vLLM's Eagle3LlamaForCausalLM only because the V1 proposer asserts that class for
    eagle3 drafts; everything it runs is EagleBeagleLlamaForCausalLM's.
    """

    def combine_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # vLLM concatenates the aux layers' states in the order the config lists them, as the trainer does.
        return self.model.block.combine(hidden_states)

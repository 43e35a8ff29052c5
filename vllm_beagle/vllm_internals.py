"""Every name of vLLM's internals that the plugin uses: underscore names, inner modules, vLLM's own ops
called by name, and classes or attributes that vLLM checks or keeps but does not offer as API. Any release
may change them.

Pinned: vLLM 0.32.x (setup.py). On an upgrade of vLLM this module is the one place to look at, with
vllm_fixes.py, whose fixes replace pieces of the pinned vLLM (each names the piece and its upstream
report) and go once the pinned vLLM carries them. What the plugin builds on as vLLM's extension points
is used where it is needed: the model registry, what a vLLM model is built from and what the EAGLE
proposer reads on it (vllm_model.py), and the attention-backend interface (attention.py).
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.attention.attention import get_attention_context
from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM
from vllm.transformers_utils.configs.eagle import EAGLEConfig
from vllm.utils.torch_utils import LayerNameType, direct_register_custom_op
from vllm.utils.torch_utils import _encode_layer_name as encode_layer_name
from vllm.utils.torch_utils import _resolve_layer_name as resolve_layer_name

__all__ = [
    # The V1 proposer asserts this class for eagle3 drafts; the plugin's eagle3 draft derives from it.
    "Eagle3LlamaForCausalLM",
    # The wrapper vLLM may put around a draft's HF config.
    "EAGLEConfig",
    # A custom op's layer-name argument, as vLLM's own attention ops pass it under torch.compile.
    "LayerNameType",
    "encode_layer_name",
    "resolve_layer_name",
    "direct_register_custom_op",
    # The forward context's attention metadata, layer, KV cache and slot mapping of one layer.
    "get_attention_context",
    "unified_attention_with_output",
    "engine_core",
]


def unified_attention_with_output(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
                                  layer_name: LayerNameType, kv_cache_dummy_dep: torch.Tensor) -> None:
    """vLLM's attention op, as its own `Attention.forward` calls it: the layer's backend computes into `output`.
    `kv_cache_dummy_dep` orders the op after the cache write that produced it."""
    torch.ops.vllm.unified_attention_with_output(query, key, value, output, layer_name,
                                                 kv_cache_dummy_dep=kv_cache_dummy_dep)


def engine_core(llm):
    """The client of an offline `LLM`'s engine core (V1's LLMEngine keeps it; LLM offers no way to stop it)."""
    return llm.llm_engine.engine_core

"""The Beagle draft layer's own vLLM attention backend, for `kv_mode: true_states`.

In the paper's no-concat mode every draft step attends to the true states only, never to the K/V
that earlier draft steps wrote. vLLM's stock backends cannot express that; this one can, because
vLLM's V1 proposer tells the metadata builder which draft step it builds for (`draft_index`): at step
d >= 1, `seq_lens` counts d positions past the last verified one, so the true states are the first
`seq_lens - d` keys. The first pass after verification (d = 0) sees only true states anyway.

The layer (`StateAttention`) takes the rows' states rather than their K and V: one fused kernel
normalises, projects, rotates and writes them into the paged cache, so the draft never materialises K
and V. Both kernels run in Triton on GPU and as their PyTorch references on CPU (vLLM does not run
Triton on CPU); BEAGLE_FORCE_TRITON=1 runs the kernels on CPU too, under TRITON_INTERPRET=1, for tests.
Each draft layer owns its cache tensor, so K and V sit where this backend puts them: K in the first
`head_size` channels of vLLM's logical [blocks, kv_heads, page, 2 * head_size] view, whatever the
physical layout.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import torch
from torch.library import Library
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from beagle_kernels.paged_cross_attention import paged_cross_attention, paged_cross_attention_ref
from beagle_kernels.state_to_cache import write_states_to_cache, write_states_to_cache_ref

from .block import BeagleBlock
from .vllm_internals import (
    LayerNameType,
    direct_register_custom_op,
    encode_layer_name,
    get_attention_context,
    resolve_layer_name,
    unified_attention_with_output,
)


def use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("BEAGLE_FORCE_TRITON") == "1"


def split_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[blocks, kv_heads, page, 2D] -> K and V views [blocks, page, kv_heads, D]."""
    return kv_cache[..., :head_size].transpose(1, 2), kv_cache[..., head_size:].transpose(1, 2)


@dataclasses.dataclass
class BeagleAttentionMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    max_seq_len: int
    max_query_len: int
    block_table: torch.Tensor
    # Keys at or past this index are the draft's own predictions; None before any draft step.
    kv_limit: torch.Tensor | None


class BeagleAttentionMetadataBuilder(AttentionMetadataBuilder[BeagleAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        # vLLM's base declares __init__ abstract; there is nothing to add to it.
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> BeagleAttentionMetadata:
        return self._build(common_attn_metadata, draft_index=0)

    def build_for_drafting(self, common_attn_metadata: CommonAttentionMetadata,
                           draft_index: int) -> BeagleAttentionMetadata:
        return self._build(common_attn_metadata, draft_index)

    def _build(self, cad: CommonAttentionMetadata, draft_index: int) -> BeagleAttentionMetadata:
        return BeagleAttentionMetadata(
            num_actual_tokens=cad.num_actual_tokens,
            query_start_loc=cad.query_start_loc,
            seq_lens=cad.seq_lens,
            max_seq_len=cad.max_seq_len,
            max_query_len=cad.max_query_len,
            block_table=cad.block_table_tensor,
            kv_limit=(cad.seq_lens - draft_index).to(torch.int32) if draft_index > 0 else None,
        )


class BeagleAttentionImpl(AttentionImpl[BeagleAttentionMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto", logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None, **_):
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise NotImplementedError("the Beagle backend has no ALiBi, sliding window or soft cap")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: BeagleAttentionMetadata | None, output,
                output_scale=None, output_block_scale=None):
        if attn_metadata is None:  # profiling run
            return output
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = split_cache(kv_cache, self.head_size)
        args = (query[:n], key_cache, value_cache, attn_metadata.block_table, attn_metadata.query_start_loc,
                attn_metadata.seq_lens, attn_metadata.kv_limit, self.scale)
        if use_triton(query.device):
            paged_cross_attention(*args, out=output[:n], max_seq_len=attn_metadata.max_seq_len,
                                  max_query_len=attn_metadata.max_query_len)
        else:
            output[:n] = paged_cross_attention_ref(*args)
        return output


class BeagleAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        # vLLM looks every backend up by name in its enum; CUSTOM is the slot for out-of-tree ones.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return BeagleAttentionImpl

    @staticmethod
    def get_builder_cls():
        return BeagleAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 128, 256]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return tuple(KVCacheLayout)  # read and written through strides


def write_states(states: torch.Tensor, norm_weight: torch.Tensor, eps: float, k_weight: torch.Tensor,
                 v_weight: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float,
                 layer_name: LayerNameType) -> torch.Tensor:
    """The draft layer's cache write, from the rows' states. Returns a dummy that the attention op takes,
    so that torch.compile keeps the write before the read, as vLLM's own cache update does."""
    _, layer, kv_cache, slot_mapping = get_attention_context(resolve_layer_name(layer_name))
    if slot_mapping is not None:
        n = slot_mapping.shape[0]  # rows past it are padding
        write = write_states_to_cache if use_triton(states.device) else write_states_to_cache_ref
        write(states[:n], norm_weight, eps, k_weight, v_weight, positions[:n], inv_freq, slot_mapping,
              *split_cache(kv_cache, layer.impl.head_size), rope_scale)
    return states.new_empty(0)


def _write_states_fake(states: torch.Tensor, *_) -> torch.Tensor:
    return states.new_empty(0)


_library = Library("vllm_beagle", "FRAGMENT")
direct_register_custom_op("write_states", write_states, fake_impl=_write_states_fake, target_lib=_library)


class StateAttention(Attention):
    """vLLM's paged attention layer on the Beagle backend, fed the rows' states instead of K and V."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, attn_backend=BeagleAttentionBackend, **kwargs)

    def forward(self, query: torch.Tensor, states: torch.Tensor, positions: torch.Tensor,
                block: BeagleBlock) -> torch.Tensor:
        """query: [T, heads * head_size], rotated; states: [T, hidden]; positions: [T] -> [T, heads * head_size]."""
        name = encode_layer_name(self.layer_name)
        written = torch.ops.vllm_beagle.write_states(
            states, block.state_norm.weight, block.state_norm.eps, block.k_proj.weight, block.v_proj.weight,
            positions, block.rotary.inv_freq, block.rotary.scaling, name)
        output = torch.empty(query.shape[0], self.num_heads * self.head_size, dtype=query.dtype, device=query.device)
        query = query.view(-1, self.num_heads, self.head_size)
        # The op's schema wants K and V tensors; the Beagle backend reads them from the cache only.
        unified_attention_with_output(query, query, query, output.view_as(query), name, kv_cache_dummy_dep=written)
        return output

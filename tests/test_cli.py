"""The `beagle` command line: help texts, the server command it builds, refusal before vLLM starts."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import BEAGLE, benchmark

from vllm_beagle.cli import SERVER_MODULE, serve_command
from vllm_beagle.train.draft_vocab import DEFAULT_SIZE


def beagle(*args, timeout=120):
    return subprocess.run([BEAGLE, *args], capture_output=True, text=True, timeout=timeout)


# One short stage-1 epoch: enough to write a checkpoint.
ONE_EPOCH = ("--stage1-epochs", "1", "--stage2-epochs", "0", "--batch-size", "32", "--warmup-steps", "1")


def train_on_shards(toy, shards, out, *options):
    """`beagle train` for the toy target on the toy shards."""
    return beagle("train", "--data", os.path.dirname(shards.files[0]), "--target", toy["target_dir"], "--out", out,
                  *options, timeout=600)


@pytest.mark.parametrize("args, words", [
    ((), ["serve", "demo"]),
    (("serve",), ["--draft", "--num-speculative-tokens", "go to vLLM"]),
    (("demo",), ["--max-tokens", "side by side", "--eager"]),
    (("train",), ["--window", "--regression-weight", "(0: the token-only objective)", "--data-fraction", "--state",
                  "--tf32"]),
    (("data",), ["--responses", "fused:A,B,C", "--no-generate", "--dtype", "--shard-size", "--answers"]),
    (("eval",), ["--eager", "sharegpt-heldout", "--json"]),
])
def test_help_explains_each_command(args, words):
    result = beagle(*args, "--help")
    assert result.returncode == 0, result.stderr
    for word in words:
        assert word in result.stdout


def test_serve_command_sets_the_method_from_the_checkpoint(toy):
    argv = serve_command(toy["target_dir"], toy["draft3_dir"], 5, ["--port", "8123", "--dtype", "float32"])
    assert argv[:3] == [sys.executable, "-m", SERVER_MODULE]
    assert argv[argv.index("--model") + 1] == toy["target_dir"]
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"method": "eagle3", "model": toy["draft3_dir"], "num_speculative_tokens": 5}
    assert argv[-4:] == ["--port", "8123", "--dtype", "float32"]


@pytest.mark.parametrize("option", [["--speculative-config", "{}"], ["-sc", "{}"], ["--speculative_config={}"],
                                    ["--speculative-config.model=x"], ["--spec-tokens", "3"]])
def test_serve_refuses_a_second_speculative_config(toy, option):
    with pytest.raises(SystemExit, match="do not pass --speculative-config"):
        serve_command(toy["target_dir"], toy["draft_dir"], 3, option)


def test_serve_listens_on_loopback_unless_told_and_hides_the_api_key(toy, capsys):
    from vllm_beagle.cli import redacted

    argv = serve_command(toy["target_dir"], toy["draft_dir"], 3, ["--port", "8123"])
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    argv = serve_command(toy["target_dir"], toy["draft_dir"], 3, ["--host", "0.0.0.0"])
    assert argv.count("--host") == 1 and "without --api-key" in capsys.readouterr().err
    argv = serve_command(toy["target_dir"], toy["draft_dir"], 3, ["--host", "0.0.0.0", "--api-key", "s3cret"])
    assert "without --api-key" not in capsys.readouterr().err
    assert "s3cret" not in " ".join(redacted(argv)) and "s3cret" not in " ".join(redacted(["--api-key=s3cret"]))
    assert "--uds" in serve_command(toy["target_dir"], toy["draft_dir"], 3, ["--uds", "/tmp/s"])
    assert "--host" not in serve_command(toy["target_dir"], toy["draft_dir"], 3, ["--uds", "/tmp/s"])


def test_serve_wants_the_target_before_any_option(toy):
    result = beagle("serve", "--port", "8000", toy["target_dir"], "--draft", toy["draft_dir"])
    assert result.returncode == 2 and "TARGET (or DRAFT) comes first" in result.stderr


def test_serve_takes_a_draft_alone_and_serves_the_target_it_names(toy):
    argv = serve_command(toy["draft_dir"], None, 3, [])
    assert argv[argv.index("--model") + 1] == toy["target_dir"]
    assert json.loads(argv[argv.index("--speculative-config") + 1])["model"] == toy["draft_dir"]
    # Clients ask for the target by its folder's name (no hub id is known for the toy), not by this path.
    assert argv[argv.index("--served-model-name") + 1] == os.path.basename(toy["target_dir"])
    assert argv.count("--served-model-name") == 1
    given = serve_command(toy["draft_dir"], None, 3, ["--served-model-name", "tiny"])
    assert given.count("--served-model-name") == 1 and given[given.index("--served-model-name") + 1] == "tiny"
    with pytest.raises(SystemExit, match="names no target"):
        serve_command(toy["draft3_dir"], None, 3, [])


def test_serve_knows_the_shipped_drafts_by_name():
    from vllm_beagle.drafts import draft_path
    from vllm_beagle.smollm2 import smollm2_dir

    smollm2_dir = smollm2_dir()
    for name in ("beagle", "eagle-baseline"):
        argv = serve_command(name, None, 3, [])
        assert argv[argv.index("--model") + 1] == smollm2_dir
        assert argv[argv.index("--served-model-name") + 1] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        spec = json.loads(argv[argv.index("--speculative-config") + 1])
        assert spec["model"] == draft_path(name)
        assert serve_command(smollm2_dir, name, 3, [])[argv.index("--model") + 1] == smollm2_dir


def test_serve_refuses_a_bad_draft_before_starting_vllm(toy, tmp_path):
    bad = str(tmp_path / "beagle-bad")
    os.makedirs(bad)
    start = time.monotonic()
    result = beagle("serve", toy["target_dir"], "--draft", bad)
    assert result.returncode == 2
    assert f"Beagle checkpoint {bad}: no config.json" in result.stderr
    assert "api_server" not in result.stderr and time.monotonic() - start < 60


def test_train_writes_a_checkpoint_that_loads_against_the_target(toy, shards, tmp_path):
    from vllm_beagle.checkpoint import load_checkpoint

    out = str(tmp_path / "beagle-trained")
    result = train_on_shards(toy, shards, out, "--window", "3", "--sim-steps", "2", "--stage1-epochs", "1",
                             "--stage2-epochs", "1", "--batch-size", "32", "--warmup-steps", "1", "--lr", "1e-3",
                             "--verifier", "org/tiny-target")
    assert result.returncode == 0, result.stderr[-3000:]
    cfg, _ = load_checkpoint(out, toy["target"].config.to_dict())
    assert cfg.training["sequences"] == len(shards) and cfg.training["window"] == 3
    # The data as the command named it and what it held (the shards' fingerprint), not a resolved path.
    assert cfg.training["data"] == [os.path.dirname(shards.files[0])] and len(cfg.training["data_fingerprint"]) == 64
    # What vLLM reads to serve the folder alone (maybe_override_with_speculators).
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["speculators_model_type"] == cfg.method == "eagle"
    assert config["speculators_config"]["verifier"]["name_or_path"] == cfg.verifier == "org/tiny-target"
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    assert cfg.draft_vocab_size == DEFAULT_SIZE  # the default: the toy target has 32,000 tokens
    assert cfg.training["command"].startswith("beagle train --data")
    assert os.path.exists(out + ".train/train_state.pt")


def test_the_hub_id_of_a_target_is_told_from_hugging_faces_cache_and_the_converted_smollm2(tmp_path):
    from vllm_beagle.smollm2 import smollm2_dir
    from vllm_beagle.verifier import SMOLLM2_HUB_ID, hub_name

    cached = tmp_path / "hub" / "models--Org--Some-Model-7B" / "snapshots" / "0123abc"
    cached.mkdir(parents=True)
    assert hub_name(str(cached)) == "Org/Some-Model-7B"
    assert hub_name(str(tmp_path)) is None
    assert hub_name(smollm2_dir()) == SMOLLM2_HUB_ID


def test_train_arch_eagle_writes_vllms_eagle_format_with_only_its_own_options(toy, shards, tmp_path):
    out = str(tmp_path / "eagle-trained")
    result = train_on_shards(toy, shards, out, "--arch", "eagle", *ONE_EPOCH)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert "beagle" not in config and config["architectures"] == ["LlamaForCausalLM"]
    training = config["training"]
    assert training["arch"] == "eagle" and training["sequences"] == len(shards)
    assert not {"window", "sim_steps", "attention"} & set(training), training


def test_train_with_a_draft_vocabulary_records_its_coverage_and_resumes_only_with_it(toy, shards, tmp_path):
    from vllm_beagle.checkpoint import load_checkpoint

    out = str(tmp_path / "beagle-vocab")
    result = train_on_shards(toy, shards, out, "--draft-vocab", "256", *ONE_EPOCH)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg, tensors = load_checkpoint(out, toy["target"].config.to_dict())
    assert cfg.draft_vocab_size == 256 and tensors["draft_to_target"].shape == (256,)
    assert 0 < cfg.training["draft_vocab_coverage"] <= 1
    assert "draft vocabulary of 256 tokens covers" in result.stdout
    # Resuming that training state with another draft vocabulary or learning rate is refused by name, and the
    # state is kept.
    state = out + ".train/train_state.pt"
    saved = os.path.getmtime(state)
    for options, field in ((["--draft-vocab", "0"], "draft_vocab"), (["--draft-vocab", "256", "--lr", "0.5"], "lr")):
        result = train_on_shards(toy, shards, out, *options, *ONE_EPOCH)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert f"the training state {state} belongs to another run: {field} differ" in result.stderr
        assert os.path.getmtime(state) == saved


@pytest.mark.parametrize("options, message", [
    (["--arch", "eagle", "--draft-vocab", "64"], "--draft-vocab, --kv-mode, --drafting and --query do not apply"),
    (["--arch", "eagle", "--query", "token+state"], "--draft-vocab, --kv-mode, --drafting and --query do not apply"),
    (["--query", "state"], "argument --query: invalid choice: 'state'"),
    (["--drafting", "parallel"], "there is no stage 2 to simulate: pass --stage2-epochs 0"),
    (["--drafting", "parallel", "--kv-mode", "true_states", "--stage2-epochs", "0"],
     "--drafting parallel needs --kv-mode concat"),
    (["--mask-token-id", "5"], "--mask-token-id is the token of parallel drafting's mask rows"),
    (["--draft-vocab", "1000000"], "draft_vocab_size must be between 1 and vocab_size 32000, got 1000000"),
    (["--window", "2", "--sim-steps", "3"], "sim_steps must be between 1 and window (2), got 3"),
    (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
    (["--attention", "sparse"], "argument --attention: invalid choice: 'sparse'"),
    (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    (["--attention", "flex", "--device", "cpu"], "attention flex needs a CUDA device"),
    (["--tf32", "--device", "cpu"], "--tf32 needs a CUDA device"),
    (["--data-fraction", "0.5", "0.5"], "--data-fraction takes one fraction for every --data folder or one for "
                                        "each of the 1, got 2"),
    (["--data-fraction", "1.5"], "--data-fraction must be in (0, 1], got 1.5"),
])
def test_train_refuses_impossible_options_by_name(toy, shards, tmp_path, options, message):
    out = str(tmp_path / "beagle-refused")
    result = train_on_shards(toy, shards, out, *options)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not os.path.exists(out)


def test_data_refuses_an_impossible_turn_count_before_making_its_folder(toy, tmp_path):
    out = tmp_path / "data"
    result = beagle("data", toy["target_dir"], "--out", str(out), "--turns", "0")
    assert result.returncode != 0 and "beagle data: --turns must be at least 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.parametrize("count", ["0", "-1"])
def test_eval_refuses_a_prompt_count_below_one_before_making_anything(tmp_path, count):
    # Without --target, eval converts SmolLM2 into ~/.cache first: HOME here shows that nothing was made.
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run([BEAGLE, "eval", "--num-prompts", count], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HOME": str(home)})
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "beagle eval: -k, --max-tokens, --batch-size and --num-prompts must be at least 1" in result.stderr
    assert list(home.iterdir()) == []


def test_train_refuses_to_write_over_a_model_that_is_not_a_draft(toy, shards):
    before = sorted(os.listdir(toy["target_dir"]))
    result = train_on_shards(toy, shards, toy["target_dir"], *ONE_EPOCH)
    assert result.returncode != 0 and "holds a model that is not a draft" in result.stderr, result.stderr[-2000:]
    assert sorted(os.listdir(toy["target_dir"])) == before


def test_train_refuses_a_folder_without_shards(toy, tmp_path):
    result = beagle("train", "--data", str(tmp_path), "--target", toy["target_dir"], "--out", str(tmp_path / "o"))
    assert result.returncode != 0 and f"no training shards (shard-*.safetensors) in {tmp_path}" in result.stderr


@pytest.mark.vllm
def test_eval_json_is_one_object_on_stdout(toy, tmp_path):
    """`beagle eval --json` on a JSONL prompt file (both record forms): stdout holds the report alone, with vLLM's
    logs elsewhere, and greedy outputs with the draft equal plain decoding."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "count on"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "and again"}]}) + "\n")
    result = beagle("eval", "--target", toy["target_dir"], "--draft", toy["draft_dir"], "--prompts", str(prompts),
                    "-k", "3", "--max-tokens", "16", "--json", "--eager", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["num_prompts"] == 2 and report["identical_outputs"] == 2, report
    assert len(report["per_position"]) == 3 and report["tau"] == pytest.approx(1 + sum(report["per_position"]))
    assert report["tokens_per_s_plain"] > 0 and report["speedup"] == pytest.approx(
        report["tokens_per_s_draft"] / report["tokens_per_s_plain"])


def test_draft_vocab_benchmark_trains_with_the_shipped_drafts_recipe():
    """benchmarks/draft_vocab.py reads its default `beagle train` options from the shipped Beagle draft's
    recorded command, so the sizes it compares are trained as the shipped draft was."""
    from vllm_beagle.cli import build_parser
    from vllm_beagle.drafts import draft_path

    bench = benchmark("draft_vocab")
    options = bench.shipped_recipe()
    assert not set(options) & set(bench.PER_RUN_OPTIONS)
    args = build_parser().parse_args(["train", "--data", "d", "--target", "t", "--out", "o", *options])
    with open(os.path.join(draft_path("beagle"), "config.json")) as f:
        recorded = json.load(f)["beagle"]["training"]
    for name in ("window", "sim_steps", "stage1_epochs", "stage2_epochs", "batch_size", "max_len", "lr",
                 "warmup_steps", "save_every", "eval_sequences"):
        assert getattr(args, name) == recorded[name], name


def test_serve_command_turns_parallel_drafting_on_for_a_parallel_draft(toy):
    argv = serve_command(toy["target_dir"], toy["draft_parallel_fused_dir"], 5, [])
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"method": "eagle3", "model": toy["draft_parallel_fused_dir"], "num_speculative_tokens": 5,
                    "parallel_drafting": True}

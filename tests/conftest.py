import json
import os
import subprocess
import sys

import pytest
import torch

from vllm_beagle.toy import build_draft
from vllm_beagle.train.data import write_examples
from vllm_beagle.train.shards import ShardSet

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU tensors through the interpreter; set TRITON_INTERPRET=0 on a GPU machine.
os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
# The console script this environment installed.
BEAGLE = os.path.join(os.path.dirname(sys.executable), "beagle")
# Prompts of different lengths, as token ids of the toy target's tokenizer (1 is BOS).
PROMPTS = [
    [1, 15043, 29892],
    [1, 450, 7483, 310, 3444, 338],
    [1, 512, 263, 21188, 15400, 29891, 2215, 3448, 29892, 727, 10600, 263, 2319, 19964, 1058],
    [1] + list(range(3000, 3040)),
    [1, 1724, 338, 13907, 1701, 11428, 29973],
]
PARITY_PROMPT = [1, 15043, 29892, 590, 1024, 338]
MAX_TOKENS = 32
# Greedy and sampled prompts in one batch: vLLM's CPU rejection sampler once corrupted the greedy ones (vllm_fixes.py).
MIXED_TEMPERATURES = [0.0, 1.0, 0.0, 0.7, 0.0]
# Training data: random prompts and the toy target's greedy responses.
PROMPT_LEN, NEW_TOKENS = 6, 26
KS = (1, 3, 5)
PARALLEL_KS = (3, 5, 7)


def benchmark(name: str):
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(HERE), "benchmarks", f"{name}.py")
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def spec(draft_dir, k, method="eagle", parallel=False):
    return {"method": method, "model": draft_dir, "num_speculative_tokens": k} | (
        {"parallel_drafting": True} if parallel else {})


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A tiny saved target and Beagle drafts for it: method eagle, method eagle3 (last layer's residual)."""
    from transformers import LlamaForCausalLM

    from vllm_beagle.toy import build_target

    root = tmp_path_factory.mktemp("toy")
    target_dir = build_target(str(root / "target"))
    target = LlamaForCausalLM.from_pretrained(target_dir).eval()
    torch.set_grad_enabled(False)
    layers = target.config.num_hidden_layers
    return {
        **vocab_draft(target, str(root / "beagle-vocab")),
        "root": root,
        "target_dir": target_dir,
        "target": target,
        # These two name the toy target as their verifier, as `beagle train` records one: vLLM serves them alone.
        "draft": build_draft(target, str(root / "beagle-draft"), verifier=target_dir),
        "draft_dir": str(root / "beagle-draft"),
        "draft3": build_draft(target, str(root / "beagle3-draft"), state=f"layer:{layers}"),
        "draft3_dir": str(root / "beagle3-draft"),
        "draft_ts": build_draft(target, str(root / "beagle-true-states"), kv_mode="true_states"),
        "draft_ts_dir": str(root / "beagle-true-states"),
        # Every state the toy target has: the embedding output, and the residuals after its two layers.
        "draft_fused": build_draft(target, str(root / "beagle3-fused"), state=f"fused:0,1,{layers}",
                                   verifier=target_dir),
        "draft_fused_dir": str(root / "beagle3-fused"),
        "draft_fused_ts": build_draft(target, str(root / "beagle3-fused-ts"), state=f"fused:0,1,{layers}",
                                      kv_mode="true_states"),
        "draft_fused_ts_dir": str(root / "beagle3-fused-ts"),
        # One forward per round (vLLM's parallel drafting); the fused one names its verifier, for vllm serve.
        "draft_parallel": build_draft(target, str(root / "beagle-parallel"), drafting="parallel"),
        "draft_parallel_dir": str(root / "beagle-parallel"),
        "draft_parallel_fused": build_draft(target, str(root / "beagle3-parallel-fused"), drafting="parallel",
                                            state=f"fused:0,1,{layers}", verifier=target_dir),
        "draft_parallel_fused_dir": str(root / "beagle3-parallel-fused"),
        # Queries that read their row's own state: fused states in concat mode (eagle3), the final state in
        # true-states mode (eagle), and parallel drafting, whose mask rows' own state is the placeholder.
        "draft_qstate": build_draft(target, str(root / "beagle3-qstate"), state=f"fused:0,1,{layers}",
                                    query="token+state"),
        "draft_qstate_dir": str(root / "beagle3-qstate"),
        "draft_qstate_ts": build_draft(target, str(root / "beagle-qstate-ts"), kv_mode="true_states",
                                       query="token+state"),
        "draft_qstate_ts_dir": str(root / "beagle-qstate-ts"),
        "draft_qstate_parallel": build_draft(target, str(root / "beagle-qstate-parallel"), drafting="parallel",
                                             query="token+state"),
        "draft_qstate_parallel_dir": str(root / "beagle-qstate-parallel"),
    }


def vocab_draft(target, out):
    """A draft over 1,000 of the 32,000 tokens: most of what the target says after PARITY_PROMPT, not all."""
    said = target.generate(torch.tensor([PARITY_PROMPT]), max_new_tokens=MAX_TOKENS, do_sample=False,
                           attention_mask=torch.ones(1, len(PARITY_PROMPT), dtype=torch.long), pad_token_id=0)
    said = sorted(set(said[0, len(PARITY_PROMPT):].tolist()))
    dropped = set(said[::4])
    others = torch.randperm(32000, generator=torch.Generator().manual_seed(1)).tolist()
    ids = [t for t in said if t not in dropped]
    ids += [t for t in others if t not in dropped and t not in ids][:1000 - len(ids)]
    ids = torch.tensor(sorted(ids))
    return {"draft_vocab": build_draft(target, out, draft_vocab=ids), "draft_vocab_dir": out,
            "draft_vocab_dropped": sorted(dropped)}


def run_vllm(target: str, runs: list[dict], tmp_dir, multiprocess: bool = False, timeout: int = 900,
             env: dict | None = None) -> dict:
    """Run engines in a fresh Python process (see vllm_worker.py) and return their results."""
    job, out = os.path.join(tmp_dir, "job.json"), os.path.join(tmp_dir, "out.json")
    with open(job, "w") as f:
        json.dump({"target": target, "runs": runs}, f)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0", **(env or {}))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "vllm_worker.py"), job, out], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"vLLM worker failed:\n{proc.stderr[-6000:]}"
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def eagle_draft(toy, tmp_path_factory):
    """The EAGLE-1 baseline for the toy target (near-identity, like the Beagle toy), in vLLM's EAGLE format."""
    from vllm_beagle.toy import build_eagle_draft

    out = str(tmp_path_factory.mktemp("eagle") / "eagle-toy")
    return {"draft": build_eagle_draft(toy["target"], out), "dir": out}


@pytest.fixture(scope="session")
def engines(toy, eagle_draft, tmp_path_factory):
    """One worker process: plain decoding, the eagle variant at K = 1, 3, 5, parallel drafts at K = 3, 5, 7
    (and a fused one at 3), a true-states draft, a reduced-vocabulary draft, fused-state drafts in both kv
    modes, token+state queries (chain in both kv modes, and parallel) and vLLM's own EAGLE-1 running our
    exported baseline at K = 3; draft forwards and draft tokens recorded for the chain, parallel and
    token+state drafts (vllm_worker.py).

    The parity request runs alone first on each drafting engine, so that its counters are its own. The
    K = 3 engines also take the batch with every other prompt sampled (MIXED_TEMPERATURES).
    """
    batch = {"prompts": PROMPTS, "max_tokens": MAX_TOKENS}
    parity = {"prompts": [PARITY_PROMPT], "max_tokens": MAX_TOKENS}
    mixed = {**batch, "temperature": MIXED_TEMPERATURES}
    runs = [{"name": "plain", "spec": None, "calls": [batch, parity]}]
    runs += [{"name": f"k{k}", "spec": spec(toy["draft_dir"], k), "calls": [parity, batch] + [mixed] * (k == 3),
              "count_draft_forwards": True} for k in KS]
    runs += [{"name": f"parallel_k{k}", "spec": spec(toy["draft_parallel_dir"], k, parallel=True),
              "calls": [parity, batch] + [mixed] * (k == 3), "count_draft_forwards": True} for k in PARALLEL_KS]
    runs.append({"name": "parallel_fused", "spec": spec(toy["draft_parallel_fused_dir"], 3, "eagle3", parallel=True),
                 "calls": [parity, batch], "count_draft_forwards": True})
    runs.append({"name": "true_states", "spec": spec(toy["draft_ts_dir"], 3), "calls": [parity, batch]})
    runs.append({"name": "draft_vocab", "spec": spec(toy["draft_vocab_dir"], 3), "calls": [parity, batch]})
    for name in ("draft_fused", "draft_fused_ts"):
        runs.append({"name": name, "spec": spec(toy[name + "_dir"], 3, "eagle3"), "calls": [parity, batch]})
    for name, method, parallel in (("draft_qstate", "eagle3", False), ("draft_qstate_ts", "eagle", False),
                                   ("draft_qstate_parallel", "eagle", True)):
        runs.append({"name": name, "spec": spec(toy[name + "_dir"], 3, method, parallel), "calls": [parity, batch],
                     "count_draft_forwards": True})
    runs.append({"name": "eagle", "spec": spec(eagle_draft["dir"], 3), "calls": [parity, batch, mixed]})
    return run_vllm(toy["target_dir"], runs, tmp_path_factory.mktemp("engines"))



def random_prompts(seed, count):
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(100, 32000, (PROMPT_LEN - 1,), generator=gen).tolist() for _ in range(count)]


@pytest.fixture(scope="session")
def shards(toy, tmp_path_factory):
    """The target's own greedy responses to random prompts; only the responses are supervised."""
    target = toy["target"]
    sequences = []
    for prompt in random_prompts(0, 64):
        out = target.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
        tokens = out[0].tolist()
        sequences.append((tokens, [i >= PROMPT_LEN for i in range(len(tokens))]))
    folder = str(tmp_path_factory.mktemp("shards"))
    assert write_examples(target, toy["draft"].cfg, sequences, folder, shard_size=20, progress=False) == 4
    return ShardSet(folder)

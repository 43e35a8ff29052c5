"""Training data: chat prompts, the target's own responses (through vLLM), and shards of target states.

`build_dataset` is `beagle data`: every stage keeps what it finished on disk (responses chunk by
chunk, shards one by one, each file written whole under a temporary name and renamed), so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from tqdm import tqdm

from ..reference import target_states
from ..schema import STATE_FINAL_NORM, STATE_LAYER, BeagleConfig
from .shards import write_shard

# What a shard folder holds, written before its first shard: a resumed run must shard the same sequences.
MANIFEST = "shards.json"


def state_name(cfg: BeagleConfig) -> str:
    """How shards name the target state they hold: "final_norm" or "layer:<l>"."""
    return STATE_FINAL_NORM if cfg.state == STATE_FINAL_NORM else f"layer:{cfg.state_layer}"


def state_options(name: str) -> dict:
    """The BeagleConfig fields of a state named by state_name."""
    if name == STATE_FINAL_NORM:
        return {"state": STATE_FINAL_NORM}
    return {"state": STATE_LAYER, "state_layer": int(name.split(":", 1)[1])}


@torch.no_grad()
def write_examples(target, cfg: BeagleConfig, sequences: list[tuple[list[int], list[bool]]], out_dir: str,
                   shard_size: int = 256, progress: bool = True) -> int:
    """Run the HF target over each (token ids, loss mask) and write the states the draft reads.

    Returns the number of shards written. Shards already on disk (whole, by construction) are kept:
    an interrupted run resumes at the first missing shard, provided it shards the same sequences the
    same way (`MANIFEST` records what the folder's shards hold; anything else is refused).
    """
    os.makedirs(out_dir, exist_ok=True)
    _claim(out_dir, {"state": state_name(cfg), "shard_size": shard_size, "sequences": len(sequences),
                     "sha256": hashlib.sha256(json.dumps(sequences).encode()).hexdigest()})
    num_shards = -(-len(sequences) // shard_size)
    for shard in tqdm(range(num_shards), desc="target states", unit="shard", disable=not progress):
        path = os.path.join(out_dir, f"shard-{shard:05d}.safetensors")
        if os.path.exists(path):
            continue
        ids, masks, states, finals = [], [], [], []
        for tokens, loss_mask in sequences[shard * shard_size:(shard + 1) * shard_size]:
            tokens = torch.tensor(tokens)
            out = target_states(target, tokens, cfg)
            ids.append(tokens)
            masks.append(torch.tensor(loss_mask))
            states.append(out.states)
            finals.append(out.final)
        write_shard(path, state_name(cfg), ids, masks, states, finals if cfg.state != STATE_FINAL_NORM else None)
    return num_shards


def _claim(out_dir: str, manifest: dict) -> None:
    """Record what `out_dir`'s shards hold, or refuse if it already holds shards of something else."""
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed = sorted(k for k in manifest if saved.get(k) != manifest[k])
        if changed:
            raise ValueError(f"{out_dir} holds shards of a different run (its {', '.join(changed)} differ: "
                             f"{ {k: saved.get(k) for k in changed} } on disk, { {k: manifest[k] for k in changed} } "
                             "now); resume with the options it was started with, or write to a new --out")
        return
    _write_json(path, manifest)


def _write_json(path: str, obj, indent: int | None = 2) -> None:
    """Whole or not at all: a killed run never leaves a half-written file under the final name."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(path + ".tmp", path)


def build_dataset(target_dir: str, out: str, cfg: BeagleConfig, dataset: str | None = None, num_prompts: int = 1000,
                  max_prompt_len: int = 1024, max_new_tokens: int = 512, heldout: int = 0, shard_size: int = 256,
                  progress: bool = True) -> dict:
    """Prompts (first user turns of a ShareGPT file) -> target responses (greedy, vLLM) -> shards.

    Records are read until `num_prompts` usable prompts are found (or the file ends). Writes `train/`
    and `heldout/` shard folders, `responses.json` and `summary.json` under `out`, and returns the
    summary: how many records were read, skipped as malformed, skipped as too long, where
    the file stopped being valid JSON (if it did), and how many sequences each split holds.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import sharegpt

    path = dataset or sharegpt.default_path()
    records = sharegpt.ShareGPTReader(path)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    prompts, read, malformed, too_long = [], 0, 0, 0
    for record in records:
        read += 1
        text = sharegpt.first_user_turn(record)
        if text is None:
            malformed += 1
            continue
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if len(ids) > max_prompt_len:
            too_long += 1
            continue
        prompts.append(list(ids))
        if len(prompts) == num_prompts:
            break
    if not prompts:
        raise ValueError(f"no usable prompt in {path}: {malformed} malformed, {too_long} longer than {max_prompt_len}")
    os.makedirs(out, exist_ok=True)
    responses = _target_responses(target_dir, prompts, max_prompt_len + max_new_tokens, max_new_tokens,
                                  os.path.join(out, "responses.json"), progress=progress)
    sequences = [(p + r, [False] * len(p) + [True] * len(r)) for p, r in zip(prompts, responses)]
    split = len(sequences) - min(heldout, len(sequences) - 1)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    write_examples(target, cfg, sequences[:split], os.path.join(out, "train"), shard_size, progress)
    if split < len(sequences):
        write_examples(target, cfg, sequences[split:], os.path.join(out, "heldout"), shard_size, progress)
    summary = {"dataset": os.path.abspath(path), "records_read": read, "skipped_malformed": malformed,
               "skipped_too_long": too_long, "file_cut_at": records.cut_at, "train_sequences": split,
               "heldout_sequences": len(sequences) - split,
               "state": state_name(cfg), "max_new_tokens": max_new_tokens}
    _write_json(os.path.join(out, "summary.json"), summary)
    return summary


def _target_responses(target_dir: str, prompts: list[list[int]], max_model_len: int, max_new_tokens: int,
                      path: str, chunk: int = 128, progress: bool = True) -> list[list[int]]:
    """The target's greedy responses, generated in chunks; `path` holds every finished chunk, so an
    interrupted run generates only what is missing."""
    done = []
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["prompts"] == prompts[:len(saved["prompts"])]:
            done = saved["responses"]
    if len(done) == len(prompts):
        return done
    from ..offline import generate, make_llm, shutdown

    llm = make_llm(target_dir, max_model_len=max_model_len, max_num_seqs=64)
    with tqdm(total=len(prompts), initial=len(done), desc="target responses", unit="prompt",
              disable=not progress) as bar:
        while len(done) < len(prompts):
            done += generate(llm, prompts[len(done):len(done) + chunk], max_new_tokens)["outputs"]
            _write_json(path, {"prompts": prompts[:len(done)], "responses": done}, indent=None)
            bar.update(len(done) - bar.n)
    shutdown(llm)
    return done

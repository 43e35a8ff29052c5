"""Training data: chat conversations, the target's own responses (through vLLM), and shards of target states.

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

from ..prompts import chat_ids
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


def check_options(turns: int) -> None:
    """ValueError for an impossible `beagle data` option; `beagle data` calls it before it makes --out."""
    if turns < 1:
        raise ValueError(f"--turns must be at least 1, got {turns}")


def build_dataset(target_dir: str, out: str, cfg: BeagleConfig, dataset: str | None = None, num_prompts: int = 1000,
                  max_prompt_len: int = 1024, max_new_tokens: int = 512, heldout: int = 0, shard_size: int = 256,
                  turns: int = 1, progress: bool = True) -> dict:
    """Conversations (user turns of a ShareGPT file) -> target responses (greedy, vLLM) -> shards.

    Records are read until `num_prompts` usable conversations are found (or the file ends). The target
    answers up to `turns` user turns of each, every turn after the first seeing its own earlier answers;
    each answered turn makes one sequence (that turn's prompt and response, the response supervised).
    A conversation ends early where the next prompt would exceed `max_prompt_len`. The last `heldout`
    conversations, all their turns, are held out. Writes `train/` and `heldout/` shard folders,
    `responses.json` and `summary.json` under `out`, and returns the summary: how many records were read,
    skipped as malformed, skipped as too long, where the file stopped being valid JSON (if it did), and
    how many sequences each split and each turn hold.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import sharegpt

    check_options(turns)
    path = dataset or sharegpt.default_path()
    records = sharegpt.ShareGPTReader(path)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    conversations, read, malformed, too_long = [], 0, 0, 0
    for record in records:
        read += 1
        texts = sharegpt.user_turns(record)
        if texts is None:
            malformed += 1
            continue
        if len(chat_ids(tokenizer, [{"role": "user", "content": texts[0]}])) > max_prompt_len:
            too_long += 1
            continue
        conversations.append(texts[:turns])
        if len(conversations) == num_prompts:
            break
    if not conversations:
        raise ValueError(f"no usable prompt in {path}: {malformed} malformed, {too_long} longer than {max_prompt_len}")
    os.makedirs(out, exist_ok=True)
    dialogues = _target_dialogues(target_dir, tokenizer, conversations, max_prompt_len, max_new_tokens,
                                  os.path.join(out, "responses.json"), progress=progress)
    split = len(dialogues) - min(heldout, len(dialogues) - 1)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    counts = {}
    for name, part in (("train", dialogues[:split]), ("heldout", dialogues[split:])):
        sequences = [(p + r, [False] * len(p) + [True] * len(r)) for dialogue in part for p, r in dialogue]
        if sequences:
            write_examples(target, cfg, sequences, os.path.join(out, name), shard_size, progress)
        counts[name] = len(sequences)
    summary = {"dataset": os.path.abspath(path), "records_read": read, "skipped_malformed": malformed,
               "skipped_too_long": too_long, "file_cut_at": records.cut_at, "train_sequences": counts["train"],
               "heldout_sequences": counts["heldout"],
               "sequences_per_turn": [sum(len(d) > j for d in dialogues) for j in range(turns)],
               "state": state_name(cfg), "max_new_tokens": max_new_tokens}
    _write_json(os.path.join(out, "summary.json"), summary)
    return summary


def _target_dialogues(target_dir: str, tokenizer, conversations: list[list[str]], max_prompt_len: int,
                      max_new_tokens: int, path: str, chunk: int = 128,
                      progress: bool = True) -> list[list[tuple[list[int], list[int]]]]:
    """Per conversation, the (prompt ids, greedy response ids) of every turn the target answered.

    Turn j's prompt holds the user turns up to j and the target's own answers to those before it (as
    text, in the chat template). Conversations go through in chunks, all turns of a chunk batched turn
    by turn; `path` holds every finished chunk, so an interrupted run generates only what is missing.
    """
    done = []
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        finished = saved.get("conversations", [])
        if finished == conversations[:len(finished)]:
            done = [[tuple(turn) for turn in d] for d in saved["dialogues"]]
    if len(done) == len(conversations):
        return done
    from ..offline import generate, make_llm, shutdown

    llm = make_llm(target_dir, max_model_len=max_prompt_len + max_new_tokens, max_num_seqs=64)
    with tqdm(total=len(conversations), initial=len(done), desc="target responses", unit="conversation",
              disable=not progress) as bar:
        while len(done) < len(conversations):
            batch = conversations[len(done):len(done) + chunk]
            dialogues = [[] for _ in batch]
            messages = [[] for _ in batch]
            for j in range(max(map(len, batch))):
                asked = []
                for i, texts in enumerate(batch):
                    if len(texts) <= j or len(dialogues[i]) < j:  # no turn j, or the conversation ended
                        continue
                    messages[i].append({"role": "user", "content": texts[j]})
                    prompt = chat_ids(tokenizer, messages[i])
                    if len(prompt) <= max_prompt_len:
                        asked.append((i, prompt))
                responses = generate(llm, [p for _, p in asked], max_new_tokens)["outputs"] if asked else []
                for (i, prompt), response in zip(asked, responses):
                    dialogues[i].append((prompt, response))
                    messages[i].append({"role": "assistant",
                                        "content": tokenizer.decode(response, skip_special_tokens=True)})
            done += dialogues
            _write_json(path, {"conversations": conversations[:len(done)], "dialogues": done}, indent=None)
            bar.update(len(done) - bar.n)
    shutdown(llm)
    return done

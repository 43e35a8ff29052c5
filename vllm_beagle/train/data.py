"""Training data: chat conversations, the target's own answers (through vLLM), and shards of target states.

`build_dataset` is `beagle data`. The answers go to a response store (`responses.py`: token ids,
compressed, small enough to commit), which is the dear part; the states the draft reads are then
extracted from them with the HF target into shards. Every stage keeps what it finished on disk
(answers by chunks of conversations, shards one by one, each file written whole), so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from tqdm import tqdm

from ..outputs import claim_manifest, exclusive, prepare_output_dir, write_json
from ..reference import target_states
from ..schema import STATE_FINAL_NORM, BeagleConfig, state_fields, state_name
from .responses import Dialogue
from .shards import shard_range, write_shard

# What a shard folder holds, written before its first shard: a resumed run must shard the same sequences.
MANIFEST = "shards.json"


@torch.no_grad()
def write_examples(target, cfg: BeagleConfig, sequences: list[tuple[list[int], list[bool]]], out_dir: str,
                   shard_size: int = 256, progress: bool = True) -> int:
    """Run the HF target over each (token ids, loss mask) and write the states the draft reads.

    Returns the number of shards written. Shards already on disk (whole, by construction) are kept:
    an interrupted run resumes at the first missing shard, provided it shards the same sequences the
    same way (`MANIFEST` records what the folder's shards hold; anything else is refused).
    """
    os.makedirs(out_dir, exist_ok=True)
    _claim(out_dir, target, cfg, {"shard_size": shard_size, "sequences": len(sequences),
                                  "sha256": hashlib.sha256(json.dumps(sequences).encode()).hexdigest()})
    num_shards = -(-len(sequences) // shard_size)
    tokens = sum(len(ids) for ids, _ in sequences)
    with tqdm(total=tokens, desc="target states", unit="tok", unit_scale=True, disable=not progress) as bar:
        for shard in range(num_shards):
            path = os.path.join(out_dir, f"shard-{shard:05d}.safetensors")
            part = sequences[shard * shard_size:(shard + 1) * shard_size]
            if not os.path.exists(path):
                _write_states(target, cfg, part, path)
            bar.update(sum(len(ids) for ids, _ in part))
    return num_shards


def _claim(out_dir: str, target, cfg: BeagleConfig, sharding: dict) -> None:
    """Record what `out_dir`'s shards hold (which state, computed in which dtype, of what, sharded how), or
    refuse if it already holds shards of something else."""
    manifest = {"state": state_name(cfg), "state_dtype": str(target.dtype).removeprefix("torch."), **sharding}
    path = os.path.join(out_dir, MANIFEST)
    saved = None
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    was, now = claim_manifest(path, manifest, saved)
    if was:
        raise ValueError(f"{out_dir} holds shards of a different run (its {', '.join(was)} differ: {was} on disk, "
                         f"{now} now); resume with the options it was started with, or write to a new --out")


def sequences_of(dialogue: Dialogue) -> list[tuple[list[int], list[bool]]]:
    """The fewest (token ids, loss mask) sequences that hold every answered turn, each answer supervised.

    Where a turn's prompt begins with the previous turn's prompt and answer (the usual case: the chat
    template re-renders the answer to the same ids), the turn continues that sequence; the target is
    causal, so its states there are the ones it had when it answered. Otherwise it starts its own.
    """
    out = []
    for prompt, answer in dialogue.turns:
        if out and prompt[:len(out[-1][0])] == out[-1][0]:
            ids, mask = out[-1]
            added = prompt[len(ids):]
            out[-1] = (ids + added + answer, mask + [False] * len(added) + [True] * len(answer))
        else:
            out.append((prompt + answer, [False] * len(prompt) + [True] * len(answer)))
    return out


def check_options(turns: int = 1, num_prompts: int | None = None, shard_size: int = 1, max_prompt_len: int = 1,
                  max_new_tokens: int = 1, max_num_seqs: int = 1, heldout: int = 0) -> None:
    """ValueError for an impossible `beagle data` option; called before --out is made or anything runs."""
    for name, value in (("--turns", turns), ("--shard-size", shard_size), ("--max-prompt-len", max_prompt_len),
                        ("--max-new-tokens", max_new_tokens), ("--max-num-seqs", max_num_seqs)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {num_prompts}")
    if heldout < 0:
        raise ValueError(f"--heldout cannot be negative, got {heldout}")


def build_dataset(target_dir: str, out: str, state: str | None = STATE_FINAL_NORM, dataset: str | None = None,
                  responses: str | None = None, num_prompts: int | None = None, max_prompt_len: int = 1024,
                  max_new_tokens: int = 512, heldout: int = 0, shard_size: int = 64, turns: int = 1, seed: int = 0,
                  dtype: str = "float32", eager: bool = False, max_num_seqs: int = 256, generate: bool = True,
                  answers: str = "target", state_dtype: str = "float32", progress: bool = True) -> dict:
    """Conversations (user turns of a ShareGPT file) -> the target's answers (greedy, vLLM) -> shards.

    Every usable conversation of the file is taken in a seeded random order (`responses.py`; never one
    with an evaluation prompt), and the first `num_prompts` of that order are used (default all): the
    first `heldout` are held out, all their turns. The answers go to the response store `responses`
    (default OUT/responses), which may already hold them: only what it lacks is generated, and with
    `generate` False nothing is, and states are made for what it holds. With `state` (a state name,
    schema.state_name) the states the draft reads are written to OUT/train and OUT/heldout, each shard
    holding the sequences of `shard_size` consecutive conversations (one sequence per conversation
    where its turns chain, `sequences_of`). A shard is written once all its conversations are answered,
    so a store that grows gains shards without the old ones being made again. With `answers` "dataset"
    the file's own assistant turns are the answers instead (own_answers.py: nothing is generated, no
    store is read, a conversation ends where it would pass max_prompt_len + max_new_tokens tokens).
    The HF target computes the states in `state_dtype`.
    Returns (and writes to OUT/summary.json) what was read, skipped, answered and sharded.
    """
    from transformers import AutoConfig, AutoTokenizer

    from ..prompts import SHAREGPT_HELDOUT, mtbench_texts
    from . import responses as store_lib
    from . import sharegpt

    check_options(turns, num_prompts, shard_size, max_prompt_len, max_new_tokens, max_num_seqs, heldout)
    target_config = AutoConfig.from_pretrained(target_dir)
    cfg = None
    if state is not None:
        cfg = BeagleConfig.from_target(target_config.to_dict(),
                                       **state_fields(state, target_config.num_hidden_layers))
    path = dataset or sharegpt.default_path()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    # The default file's last records are the `sharegpt-heldout` prompt set.
    conversations, counts = store_lib.select_conversations(path, tokenizer, max_prompt_len, turns, seed,
                                                           mtbench_texts(), SHAREGPT_HELDOUT if dataset is None else 0)
    if not conversations:
        raise ValueError(f"no usable conversation in {path}: {counts}")
    wanted = conversations[:num_prompts]
    if answers == "dataset":
        from .own_answers import dataset_dialogues

        dialogues = dataset_dialogues(path, wanted, tokenizer, max_prompt_len + max_new_tokens, turns)
        source = {"answers": "dataset", "dataset_sha256": store_lib.file_sha256(path), "seed": seed,
                  "turns": turns, "max_len": max_prompt_len + max_new_tokens}
    else:
        store = store_lib.ResponseStore(responses or os.path.join(out, "responses"))
        store.claim(store_lib.generation_manifest(target_dir, path, max_prompt_len, max_new_tokens, turns, seed,
                                                  dtype, eager, len(conversations)))
        if generate:
            with exclusive(store.folder, "the response store"):
                store_lib.generate(target_dir, store, wanted, tokenizer, max_prompt_len, max_new_tokens, dtype,
                                   eager, max_num_seqs, progress=progress)
        dialogues = {d.index: d for d in store.dialogues() if d.index < len(wanted)}
        source = store.manifest()
    held = min(heldout, len(wanted) - 1)
    summary = {"dataset": os.path.abspath(path), **counts, "conversations_usable": len(conversations),
               "conversations_wanted": len(wanted), "heldout_conversations": held,
               "answers": answers, **({} if answers == "dataset" else {"responses": os.path.abspath(store.folder)}),
               **store_lib.summarize(dialogues.values())}
    if cfg is not None:
        from transformers import AutoModelForCausalLM

        from ..cpu import warn_if_slow_bf16

        if state_dtype == "bfloat16":  # the target runs on the CPU
            warn_if_slow_bf16("beagle data --state-dtype bfloat16")
        target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=getattr(torch, state_dtype)).eval()
        # What the shards' answers are: the store's manifest, or the file and settings of its own answers.
        store_id = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()
        with exclusive(out, "the data folder"):
            for name, first, end in (("heldout", 0, held), ("train", held, len(wanted))):
                if end > first:
                    summary[name] = write_conversation_shards(target, cfg, dialogues, first, end, shard_size,
                                                              os.path.join(out, name), store_id, progress)
        summary["state"], summary["state_dtype"] = state_name(cfg), state_dtype
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "summary.json"), summary)
    return summary


@torch.no_grad()
def write_conversation_shards(target, cfg: BeagleConfig, dialogues: dict[int, Dialogue], first: int, end: int,
                              per_shard: int, out_dir: str, store_id: str, progress: bool = True) -> dict:
    """Shard k of `out_dir` holds the sequences of conversations first + k * per_shard onwards (up to
    `per_shard` of them, none past `end`). Shards already on disk for the same range are kept; a shard
    whose conversations are not all answered yet is left for a later run. Returns the counts."""
    os.makedirs(out_dir, exist_ok=True)
    _claim(out_dir, target, cfg, {"conversations_per_shard": per_shard, "first": first, "responses": store_id})
    ranges = [(lo, min(lo + per_shard, end)) for lo in range(first, end, per_shard)]
    ready = [(k, lo, hi) for k, (lo, hi) in enumerate(ranges) if all(i in dialogues for i in range(lo, hi))]
    todo = [(k, lo, hi) for k, lo, hi in ready if shard_range(_shard_path(out_dir, k)) != (lo, hi)]
    tokens = sum(len(ids) for _, lo, hi in todo for i in range(lo, hi) for ids, _ in sequences_of(dialogues[i]))
    width = cfg.state_width + (cfg.hidden_size if cfg.state != STATE_FINAL_NORM else 0)
    prepare_output_dir(out_dir, tokens * width * 2, f"the {state_name(cfg)} states of {tokens} tokens")
    sequences = 0
    with tqdm(total=tokens, desc=f"target states ({os.path.basename(out_dir)})", unit="tok", unit_scale=True,
              disable=not progress or not todo) as bar:
        for k, lo, hi in ready:
            part = [seq for i in range(lo, hi) for seq in sequences_of(dialogues[i])]
            sequences += len(part)
            if (k, lo, hi) in todo:
                _write_states(target, cfg, part, _shard_path(out_dir, k), {"conversations": f"{lo}-{hi}"})
                bar.update(sum(len(ids) for ids, _ in part))
    return {"shards": len(ready), "shards_waiting_for_answers": len(ranges) - len(ready), "sequences": sequences}


def _shard_path(out_dir: str, k: int) -> str:
    return os.path.join(out_dir, f"shard-{k:05d}.safetensors")


def _write_states(target, cfg: BeagleConfig, sequences: list[tuple[list[int], list[bool]]], path: str,
                  metadata: dict | None = None) -> None:
    ids, masks, states, finals = [], [], [], []
    for token_ids, loss_mask in sequences:
        token_ids = torch.tensor(token_ids)
        out = target_states(target, token_ids, cfg, logits=False)
        ids.append(token_ids)
        masks.append(torch.tensor(loss_mask))
        states.append(out.states)
        finals.append(out.final)
    write_shard(path, state_name(cfg), ids, masks, states, finals if cfg.state != STATE_FINAL_NORM else None,
                metadata)

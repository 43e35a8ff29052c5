"""compare.summarize: speed-ups over the mean of the plain engines that bookend a run, outputs compared
with the first plain engine's, and a draft's counters passed through."""

import pytest

from vllm_beagle.compare import PLAIN, PLAIN_AGAIN, bookended, summarize

SPEC = {"tau": 2.0, "per_position_rate": [0.6, 0.3, 0.1], "num_drafts": 50, "num_accepted_tokens": 50}


def run(tokens: int, seconds: float, outputs: list[list[int]], spec: dict | None = None) -> dict:
    return {"outputs": outputs, "num_output_tokens": tokens, "seconds": seconds, "spec": spec or {}}


def test_bookended_puts_plain_decoding_first_and_last():
    assert list(bookended({"a": {"method": "ngram"}, "b": None})) == [PLAIN, "a", "b", PLAIN_AGAIN]


def test_speedups_are_over_the_mean_of_both_plain_speeds_and_outputs_against_the_first():
    first, again = run(100, 10.0, [[1, 2], [3]]), run(100, 5.0, [[1, 2], [4]])  # 10 and 20 tok/s
    drafted = run(100, 4.0, [[1, 2], [3]], SPEC)  # 25 tok/s
    summary = summarize({PLAIN: first, "draft": drafted, PLAIN_AGAIN: again})
    assert summary["draft"]["speedup"] == pytest.approx(25 / 15)
    assert summary[PLAIN]["speedup"] == pytest.approx(10 / 15)
    assert summary[PLAIN_AGAIN]["speedup"] == pytest.approx(20 / 15)
    assert summary["draft"]["identical_outputs"] == 2 and summary[PLAIN_AGAIN]["identical_outputs"] == 1
    assert summary["draft"]["tau"] == 2.0 and summary["draft"]["per_position"] == [0.6, 0.3, 0.1]
    assert "tau" not in summary[PLAIN_AGAIN]


def test_one_plain_engine_is_the_baseline_alone():
    summary = summarize({PLAIN: run(100, 10.0, [[1]]), "draft": run(100, 5.0, [[2]], SPEC)})
    assert summary["draft"]["speedup"] == pytest.approx(2.0) and summary["draft"]["identical_outputs"] == 0

"""vLLM's spec-decode counters, read both ways the project reads them: from an offline engine's metrics
(offline.spec_counters) and from a server's /metrics page (load.spec_metrics). Both sum the samples of
every engine and give the same counters for the same numbers."""

from types import SimpleNamespace

from vllm_beagle.load import spec_metrics
from vllm_beagle.offline import SpecCounters, spec_counters

# Two engines; the per-position counts of engine 0 and 1 are [6, 2, 1] and [2, 1, 0].
TOTALS = {"vllm:spec_decode_num_drafts": (10, 4), "vllm:spec_decode_num_draft_tokens": (30, 12),
          "vllm:spec_decode_num_accepted_tokens": (9, 3)}
PER_POSITION = ([6, 2, 1], [2, 1, 0])
EXPECTED = SpecCounters(num_drafts=14, num_draft_tokens=42, num_accepted_tokens=12, accepted_per_pos=[8, 3, 1])


def metrics_page() -> str:
    lines = []
    for name, values in TOTALS.items():
        lines.append(f"# TYPE {name} counter")
        lines += [f'{name}_total{{engine="{e}",model_name="m"}} {float(v)}' for e, v in enumerate(values)]
    name = "vllm:spec_decode_num_accepted_tokens_per_pos"
    lines.append(f"# TYPE {name} counter")
    lines += [f'{name}_total{{engine="{e}",model_name="m",position="{p}"}} {float(v)}'
              for e, counts in enumerate(PER_POSITION) for p, v in enumerate(counts)]
    lines += ["# TYPE vllm:num_requests_running gauge", 'vllm:num_requests_running{engine="0",model_name="m"} 1.0',
              "# TYPE vllm:num_requests_waiting gauge", 'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0',
              "# TYPE vllm:e2e_request_latency_seconds histogram",
              'vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 5.0',
              'vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 2.5']
    return "\n".join(lines) + "\n"


class OfflineEngine:
    """What vLLM's LLM.get_metrics() returns: a Counter per engine, the per-position counter as one Vector
    per engine, and metrics of other kinds."""

    def get_metrics(self):
        metrics = [SimpleNamespace(name=name, value=v) for name, values in TOTALS.items() for v in values]
        metrics += [SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens_per_pos", values=counts)
                    for counts in PER_POSITION]
        metrics += [SimpleNamespace(name="vllm:num_requests_running", value=1.0),
                    SimpleNamespace(name="vllm:e2e_request_latency_seconds", count=5, sum=2.5)]
        return metrics


def test_a_servers_metrics_page_sums_every_engine():
    counters, gauges = spec_metrics(metrics_page())
    assert counters == EXPECTED
    assert gauges == {"vllm:num_requests_running": 1.0, "vllm:num_requests_waiting": 0.0}


def test_an_offline_engines_metrics_give_the_same_counters():
    assert spec_counters(OfflineEngine()) == EXPECTED

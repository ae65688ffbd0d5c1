"""The simple expected-completion picker that benchmarks.routing's ``baseline`` policy runs
(benchmarks/baseline_picker.py): its telemetry and ranking, without servers."""

from __future__ import annotations

from benchmarks.baseline_picker import Baseline
from extproc.config import parse_fleet


def baseline() -> Baseline:
    fleet = parse_fleet(
        {
            "hosts": [
                {
                    "name": n,
                    "address": "127.0.0.1",
                    "http_port": p,
                    "grpc_port": p + 1,
                    "metrics_port": p + 2,
                    "tier": "gpu",
                    "launch": {"models": ["m"]},
                }
                for n, p in (("a", 8000), ("b", 8010))
            ],
            "models": [{"name": "m", "tiers": ["gpu"]}],
        }
    )
    return Baseline(fleet)


def metrics(success: int, compute_us: int) -> str:
    labels = 'model="m",version="1"'
    return (
        f"nv_inference_request_success{{{labels}}} {success}\n"
        f"nv_inference_compute_infer_duration_us{{{labels}}} {compute_us}\n"
    )


def test_each_request_goes_where_it_would_finish_first() -> None:
    """(in_flight / max_batch + 1) x mean batch time: a 4x slower host gets a request once the fast one
    has three batches' worth in flight."""
    b = baseline()
    a_spec, b_spec = b.hosts
    b.max_batch["m"] = 2.0
    for host, per_request_us in ((a_spec, 10_000), (b_spec, 40_000)):
        b.apply_metrics(host, metrics(0, 0))
        b.apply_metrics(host, metrics(10, 10 * per_request_us))
    assert b.batch_ms == {("a", "m"): 10.0, ("b", "m"): 40.0}
    firsts = [b.rank("m")[0].name for _ in range(8)]
    # a: (n/2 + 1) x 10 <= 40 while n <= 6 (ties go to the first listed).
    assert firsts == ["a"] * 7 + ["b"]
    assert [h.name for h in b.rank("m")] == ["a", "b"]


def test_envoy_counts_replace_the_picks_since_the_last_poll() -> None:
    b = baseline()
    b.rank("m")
    assert sum(b.picks.values()) == 1 and not b.ready
    endpoint = b.hosts[1].http_endpoint
    address, port = endpoint.rsplit(":", 1)
    doc = {
        "cluster_statuses": [
            {
                "name": "triton_gpu_http",
                "host_statuses": [
                    {
                        "address": {"socket_address": {"address": address, "port_value": int(port)}},
                        "stats": [{"name": "rq_active", "value": "3"}],
                    }
                ],
            }
        ]
    }
    b.apply_envoy(doc)
    assert b.polled == {"a": 0, "b": 3} and sum(b.picks.values()) == 0 and b.ready


def test_a_counter_reset_is_not_a_sample() -> None:
    b = baseline()
    host = b.hosts[0]
    b.apply_metrics(host, metrics(10, 100_000))
    b.apply_metrics(host, metrics(20, 200_000))
    b.apply_metrics(host, metrics(5, 500_000))  # Triton restarted: counted from zero, as Prometheus does
    assert b.batch_ms[("a", "m")] == 0.5 * 100.0 + 0.5 * 10.0

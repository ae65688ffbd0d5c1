"""``extproc status``: parsing the picker's ``/status``, merging Envoy's view, the table, ``--watch`` and the
HTTP clients against a real local HTTP server. (The end-to-end check is in test_models_ops.py, which
already runs the local stack.)"""

from __future__ import annotations

import datetime as dt
import io
import json
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from extproc.cli import _parser
from extproc.config import Fleet, parse_fleet
from extproc.ops import OpsError
from extproc.ops import status as st
from extproc.telemetry.envoy_admin import EndpointStatus

DATA = Path(__file__).parent / "data"

FLEET: dict[str, Any] = {
    "hosts": [
        {"name": "triton-a", "address": "127.0.0.1", "tier": "gpu", "http_port": 37621, "grpc_port": 37631},
        {"name": "triton-b", "address": "127.0.0.2", "tier": "gpu", "http_port": 37622, "grpc_port": 37632},
        {"name": "triton-c", "address": "127.0.0.3", "tier": "cpu"},
    ],
    "picker": {"metrics_address": "0.0.0.0", "metrics_port": 9191, "control_token_file": "/run/token"},
    "envoy": {"admin": {"address": "127.0.0.1", "port": 9911}},
}


def fleet() -> Fleet:
    return parse_fleet(FLEET)


def host_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "tier": "gpu",
        "fresh": True,
        "routable": True,
        "ready": {"embed_normalize": ["1"], "timed_batch": ["1", "2"]},
        "in_flight": 2.0,
        "pending": 1,
        "service_ms": 12.345,
        "queue_ms": 0.5,
        "gpu_memory_used": 3 * 2**30,
        "gpu_memory_total": 12 * 2**30,
        "draining": False,
        "ejected": False,
        "unhealthy": False,
        "age_s": {"metrics": 0.2, "index": 0.7, "envoy": 0.1},
    }
    doc.update(overrides)
    return doc


STATUS: dict[str, Any] = {
    "ready": True,
    "hosts": {
        "triton-a": host_doc(),
        "triton-b": host_doc(draining=True, ejected=True, routable=False, in_flight=0.25, gpu_memory_used=None),
        "triton-c": host_doc(
            tier="cpu",
            fresh=False,
            routable=False,
            ready={},
            service_ms=None,
            queue_ms=None,
            gpu_memory_used=None,
            gpu_memory_total=None,
            age_s={"metrics": None, "index": None, "envoy": 0.1},
        ),
    },
}


class FakePicker:
    def __init__(self, doc: Any = STATUS, url: str = "http://picker") -> None:
        self.doc = doc
        self._url = url

    @property
    def url(self) -> str:
        return self._url

    def status(self) -> st.PickerStatus:
        if self.doc is None:
            raise st.PickerError(f"picker GET {self._url}/status: connection refused")
        return st.parse_picker_status(self.doc, self._url)

    def drain(self, host: str) -> bool:
        return True

    def undrain(self, host: str) -> bool:
        return False


class FakeEnvoy:
    def __init__(self, endpoints: Mapping[str, EndpointStatus] | None) -> None:
        self._endpoints = endpoints
        self.url = "http://envoy"

    def endpoints(self) -> Mapping[str, EndpointStatus]:
        if self._endpoints is None:
            raise st.EnvoyError("envoy admin GET http://envoy/clusters?format=json: timed out")
        return self._endpoints


def test_parse_status_is_typed_and_tolerant() -> None:
    status = st.parse_picker_status(STATUS, "http://p")
    a = status.hosts["triton-a"]
    assert a.ready == {"embed_normalize": ("1",), "timed_batch": ("1", "2")}
    assert a.gpu_memory_free == 9 * 2**30 and a.gpu_memory_percent == 25.0
    assert status.hosts["triton-b"].gpu_memory_percent is None
    minimal = st.parse_picker_status({"ready": False, "hosts": {"x": {"tier": "cpu", "new_field": 1}}})
    assert minimal.hosts["x"].in_flight == 0.0 and minimal.hosts["x"].service_ms is None
    with pytest.raises(st.PickerError):
        st.parse_picker_status({"ready": True})


def test_host_state_words() -> None:
    status = st.parse_picker_status(STATUS)
    assert st.host_state(status.hosts["triton-a"], None) == "ok"
    assert st.host_state(status.hosts["triton-b"], None) == "draining,ejected"
    assert st.host_state(status.hosts["triton-c"], None) == "stale"
    assert st.host_state(None, st.EnvoyHost(unhealthy=True, listed=True)) == "unhealthy"
    assert st.host_state(None, st.EnvoyHost(listed=True)) == "up (envoy)"
    assert st.host_state(None, None) == "unknown"


def test_envoy_view_per_host_from_a_real_clusters_page() -> None:
    from extproc.telemetry.envoy_admin import parse_clusters

    endpoints = parse_clusters(json.loads((DATA / "envoy_clusters.json").read_text()))
    hosts = st.envoy_hosts(fleet().hosts, endpoints)
    assert hosts["triton-a"] == st.EnvoyHost(active=3, ejected=False, unhealthy=False, listed=True)
    assert hosts["triton-b"].ejected and hosts["triton-b"].unhealthy
    assert hosts["triton-c"] == st.EnvoyHost()


def test_table_shows_a_summary_per_tier_then_every_host() -> None:
    endpoints = {"127.0.0.1:37621": EndpointStatus(rq_active=2), "127.0.0.2:37622": EndpointStatus()}
    snapshot = st.collect(fleet().hosts, [FakePicker()], [FakeEnvoy(endpoints)])
    lines = st.render(snapshot).splitlines()
    assert lines[1] == "envoy admin http://envoy: ok"
    assert lines[3] == "picker http://picker: ready, 3 hosts"
    assert lines[4].split() == [
        "TIER",
        "HOSTS",
        "OK",
        "DRAINING",
        "EJECTED",
        "UNHEALTHY",
        "STALE",
        "OTHER",
        "IN-FLIGHT",
        "ENVOY",
        "PENDING",
        "QUEUE",
        "max",
        "GPU",
        "MEM",
        "MODELS",
    ]
    summary = {line.split()[0]: line.split()[1:] for line in lines[5:8]}
    # GPU memory: 3 GiB used of triton-a's 12 (triton-b reports none); the cpu tier's host is stale.
    assert summary == {
        "gpu": ["2", "1", "1", "1", "0", "0", "0", "2.25", "2", "2", "0.5", "25%", "2"],
        "cpu": ["1", "0", "0", "0", "0", "1", "0", "2", "0", "1", "-", "-", "0"],
        "all": ["3", "1", "1", "1", "0", "1", "0", "4.25", "2", "3", "0.5", "25%", "2"],
    }
    assert lines[8] == ""
    assert [h.strip() for h in lines[9].split("  ") if h.strip()] == [
        "HOST",
        "TIER",
        "STATE",
        "AGE s",
        "IN-FL",
        "ENVOY",
        "PEND",
        "SVC ms",
        "QUEUE ms",
        "GPU",
        "MODELS READY",
    ]
    rows = {line.split()[0]: line.split() for line in lines[10:]}
    assert rows["triton-a"] == [
        "triton-a",
        "gpu",
        "ok",
        "0.7",
        "2",
        "2",
        "1",
        "12.3",
        "0.5",
        "25%",
        "embed_normalize",
        "timed_batch:1,2",
    ]
    assert rows["triton-b"][:6] == ["triton-b", "gpu", "draining,ejected", "0.7", "0.25", "0"]
    assert rows["triton-c"] == ["triton-c", "cpu", "stale", "never", "2", "0", "1", "-", "-", "-", "(none)"]
    # Columns line up: every row is as wide as the header up to the models column.
    models_at = lines[9].index("MODELS READY")
    assert all(line[models_at - 2 : models_at] == "  " for line in lines[10:])


def test_filters_sort_and_top() -> None:
    snapshot = st.collect(fleet().hosts, [FakePicker()], [])

    def hosts(**view: Any) -> list[str]:
        text = st.render(snapshot, st.View(**view))
        return [line.split()[0] for line in text.splitlines() if line.startswith("triton-")]

    assert hosts() == ["triton-a", "triton-b", "triton-c"]
    assert hosts(states=frozenset({"not-ok"})) == ["triton-b", "triton-c"]
    assert hosts(states=frozenset({"stale", "ejected"})) == ["triton-b", "triton-c"]
    assert hosts(states=frozenset({"ok"})) == ["triton-a"]
    assert hosts(tiers=frozenset({"cpu"})) == ["triton-c"]
    assert hosts(models=frozenset({"timed_batch"}), states=frozenset({"draining"})) == ["triton-b"]
    assert hosts(sort="state") == ["triton-b", "triton-c", "triton-a"]
    assert hosts(sort="in-flight") == ["triton-a", "triton-c", "triton-b"]
    assert hosts(sort="gpu") == ["triton-a", "triton-b", "triton-c"]  # no number: last
    assert hosts(sort="age") == ["triton-c", "triton-a", "triton-b"]  # never heard from: first
    text = st.render(snapshot, st.View(tiers=frozenset({"gpu"}), sort="in-flight", top=1))
    assert "picker http://picker: ready, 3 hosts; 2 of 3 match --tier gpu" in text
    assert [line.split()[0] for line in text.splitlines() if line.startswith(("gpu", "cpu", "all"))] == ["gpu"]
    assert "... 1 more hosts (--top N, --sort KEY, --tier/--state/--model)" in text


def fleet_of(count: int) -> tuple[Fleet, dict[str, Any]]:
    """``count`` hosts named as a pool's, with long model names, every state and large numbers."""
    hosts, docs = [], {}
    for i in range(count):
        tier = "gpu" if i % 5 else "cpu"
        name = f"triton-{tier}-10-0-{i // 250}-{i % 250}"
        hosts.append({"name": name, "address": f"10.0.{i // 250}.{i % 250 + 1}", "tier": tier})
        docs[name] = host_doc(
            tier=tier,
            fresh=i % 97 != 0,
            draining=i % 13 == 0,
            ejected=i % 17 == 0,
            unhealthy=i % 19 == 0,
            ready={f"a_rather_long_model_name_{j}": ["1", "2"] for j in range(i % 12)},
            in_flight=i * 1.25,
            pending=i * 10,
            service_ms=1234.5,
            queue_ms=98765.4,
        )
    return parse_fleet({"hosts": hosts}), {"ready": True, "hosts": docs}


def test_status_of_1000_hosts_fits_120_columns() -> None:
    big, doc = fleet_of(1000)
    endpoints = {h.http_endpoint: EndpointStatus(rq_active=1000 + i) for i, h in enumerate(big.hosts)}
    snapshot = st.collect(big.hosts, [FakePicker(doc)], [FakeEnvoy(endpoints)])
    text = st.render(snapshot)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert len([line for line in lines if line.startswith("triton-")]) == 1000
    summary = {line.split()[0]: line.split()[1:8] for line in lines if line.startswith(("gpu ", "cpu ", "all "))}
    assert summary["all"] == ["1000", "814", "77", "59", "53", "11", "0"]
    assert summary["gpu"][0] == "800" and summary["cpu"][0] == "200"
    # Models beyond the width are counted, not cut: with every state word in some row, only a count fits.
    row = next(line for line in lines if line.startswith("triton-gpu-10-0-0-11 "))
    assert row.endswith("  25%  +11"), row
    narrow = st.render(snapshot, st.View(states=frozenset({"ok"}), top=20)).splitlines()
    row = next(line for line in narrow if line.startswith("triton-gpu-10-0-0-11 "))
    assert row.endswith("  25%  a_rather_long_model_name_0:1,2 +10"), row
    worst = st.render(snapshot, st.View(sort="queue", top=10, states=frozenset({"not-ok"})))
    assert max(len(line) for line in worst.splitlines()) <= 120


def test_unreachable_picker_and_envoy_are_reported_not_raised() -> None:
    snapshot = st.collect(fleet().hosts, [FakePicker(None)], [FakeEnvoy(None)])
    text = st.render(snapshot)
    assert "envoy admin http://envoy: envoy admin GET http://envoy/clusters?format=json: timed out" in text
    assert "picker http://picker: UNREACHABLE: picker GET http://picker/status: connection refused" in text
    assert [line.split()[:3] for line in text.splitlines() if line.startswith("triton-")] == [
        ["triton-a", "gpu", "unknown"],
        ["triton-b", "gpu", "unknown"],
        ["triton-c", "cpu", "unknown"],
    ]
    assert not st.snapshot_ok(snapshot)
    out = io.StringIO()
    assert st.run_status(fleet().hosts, [FakePicker(None)], [], watch_s=None, out=out) == 1


def test_json_output() -> None:
    out = io.StringIO()
    endpoints = {"127.0.0.1:37621": EndpointStatus(rq_active=1, failed_outlier_check=True)}
    code = st.run_status(fleet().hosts, [FakePicker()], [FakeEnvoy(endpoints)], watch_s=None, as_json=True, out=out)
    assert code == 0
    doc = json.loads(out.getvalue())
    a = doc["pickers"]["http://picker"]["hosts"]["triton-a"]
    assert a["state"] == "ok" and a["ready"]["timed_batch"] == ["1", "2"] and a["gpu_memory_total"] == 12 * 2**30
    assert doc["pickers"]["http://picker"]["summary"]["gpu"] == {
        "hosts": 2,
        "ok": 1,
        "draining": 1,
        "ejected": 1,
        "unhealthy": 0,
        "stale": 0,
        "other": 0,
        "in_flight": 2.25,
        "envoy_active": 1,
        "pending": 2,
        "queue_ms_max": 0.5,
        "gpu_memory_percent": 25.0,
        "models_ready": 2,
    }
    assert doc["envoys"]["http://envoy"]["hosts"]["triton-a"] == {
        "active": 1,
        "ejected": True,
        "unhealthy": False,
        "listed": True,
    }


def test_json_follows_the_view() -> None:
    out = io.StringIO()
    view = st.View(states=frozenset({"not-ok"}), sort="in-flight", top=1)
    assert st.run_status(fleet().hosts, [FakePicker()], [], watch_s=None, as_json=True, view=view, out=out) == 0
    picker = json.loads(out.getvalue())["pickers"]["http://picker"]
    assert list(picker["hosts"]) == ["triton-c"]
    assert picker["summary"]["all"]["hosts"] == 2 and set(picker["summary"]) == {"gpu", "cpu", "all"}


def test_a_watch_frame_fits_the_terminal() -> None:
    frame = "\n".join(f"line {i} " + "x" * 200 for i in range(100)) + "\nrefreshing every 2 s; Ctrl-C to stop\n"
    lines = st.fit_frame(frame, 80, 24).splitlines()
    assert len(lines) == 23 and max(len(line) for line in lines) <= 80
    assert lines[-2] == "... 79 more lines (--top N, --tier/--state/--model)"
    assert lines[-1] == "refreshing every 2 s; Ctrl-C to stop"
    assert st.fit_frame("a\nb\n", 80, 24) == "a\nb\n"


def test_watch_refreshes_in_place_until_interrupted() -> None:
    out = io.StringIO()
    sleeps: list[float] = []
    code = st.run_status(fleet().hosts, [FakePicker()], [], watch_s=0.5, out=out, sleep=sleeps.append, iterations=3)
    assert code == 0 and sleeps == [0.5, 0.5]
    frames = out.getvalue().split(st.CLEAR)
    assert frames[0] == "" and len(frames) == 4
    assert all("refreshing every 0.5 s; Ctrl-C to stop" in f for f in frames[1:])

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    out = io.StringIO()
    assert st.run_status(fleet().hosts, [FakePicker()], [], watch_s=1, out=out, sleep=interrupt) == 0
    assert out.getvalue().count(st.CLEAR) == 1


def test_default_urls_come_from_the_fleet_file() -> None:
    assert st.default_picker_url(fleet()) == "http://127.0.0.1:9191"  # 0.0.0.0 is reached on loopback
    assert st.default_envoy_admin_url(fleet()) == "http://127.0.0.1:9911"


def test_cli_options() -> None:
    args = _parser().parse_args(["status", "--watch"])
    assert args.watch == 2.0 and not args.once
    args = _parser().parse_args(["status", "--watch", "0.5", "--picker", "http://a", "--picker", "http://b"])
    assert args.watch == 0.5 and args.picker == ["http://a", "http://b"]
    args = _parser().parse_args(["status", "--once", "--json", "--no-envoy"])
    assert args.once and args.json and args.no_envoy
    args = _parser().parse_args(["status", "--tier", "gpu", "--state", "not-ok", "--model", "m", "--sort", "queue"])
    assert (args.tier, args.state, args.model, args.sort, args.top) == (["gpu"], ["not-ok"], ["m"], "queue", None)
    with pytest.raises(SystemExit):
        _parser().parse_args(["status", "--sort", "nope"])


# --- the HTTP clients against a real server ----------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    drained: ClassVar[set[str]] = set()

    def log_message(self, *_: Any) -> None:
        pass

    def _json(self, code: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/status":
            self._json(200, STATUS)
        elif self.path == "/clusters?format=json":
            self._json(200, json.loads((DATA / "envoy_clusters.json").read_text()))
        else:
            self._json(404, {"error": "nope"})

    def do_POST(self) -> None:
        parts = self.path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "hosts" and parts[1] in STATUS["hosts"]:
            drain = parts[2] == "drain"
            (self.drained.add if drain else self.drained.discard)(parts[1])
            self._json(200, {"host": parts[1], "draining": drain})
        else:
            self._json(404, {"error": f"no host named {parts[1]!r} in this fleet"})


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_picker_and_envoy_admin(server: str) -> None:
    picker = st.HttpPicker(server + "/")
    assert picker.url == server
    assert picker.status().hosts["triton-b"].draining
    assert picker.drain("triton-a") is True and "triton-a" in _Handler.drained
    assert picker.undrain("triton-a") is False and "triton-a" not in _Handler.drained
    with pytest.raises(st.PickerError, match="HTTP 404: no host named 'nope' in this fleet"):
        picker.drain("nope")
    endpoints = st.HttpEnvoyAdmin(server).endpoints()
    assert endpoints["127.0.0.1:37621"].rq_active == 3


def test_http_clients_report_a_closed_port() -> None:
    from benchmarks.ports import free_ports

    (port,) = free_ports(1)
    with pytest.raises(st.PickerError, match="refused"):
        st.HttpPicker(f"http://127.0.0.1:{port}", timeout_s=2).status()
    with pytest.raises(OpsError):
        st.HttpEnvoyAdmin(f"http://127.0.0.1:{port}", timeout_s=2).endpoints()


def test_models_refusing_for_load_are_named_from_the_pickers_metrics() -> None:
    """The picker's own /metrics text (a real PickerMetrics registry): a model refused for load within the
    last 10 s is shown as overloaded, with its counts; one that only admitted, or refused long ago, is not."""
    import dataclasses

    from prometheus_client import generate_latest

    from extproc.config import Tier
    from extproc.datapath.datastore import Datastore
    from extproc.datapath.metrics import PickerMetrics

    metrics = PickerMetrics(Datastore(fleet()))
    for _ in range(3):
        metrics.admission(("busy", "standard", "admitted"))
    metrics.admission(("busy", "standard", "overloaded"))
    metrics.admission(("busy", "sheddable", "fair_share"))
    metrics.admission(("calm", "standard", "admitted"))
    metrics.flush()
    metrics.routed(("calm", Tier.GPU, "g1", "classified"), 1e-4)
    loads = st.parse_overload(generate_latest(metrics.registry).decode())
    assert loads["busy"].admitted == 3 and loads["busy"].refused == 2 and loads["busy"].refused_at is not None
    assert loads["calm"] == st.ModelLoad(admitted=1)

    snapshot = st.collect(fleet().hosts, [FakePicker()], [])
    url, status = snapshot.pickers[0]
    assert isinstance(status, st.PickerStatus)
    snapshot = dataclasses.replace(snapshot, pickers=((url, dataclasses.replace(status, overload=loads)),))
    text = st.render(snapshot)
    assert "overloaded (refusing in the last 10 s): busy (refused 2 of 5 since start)" in text
    assert "calm (" not in text
    assert st.snapshot_json(snapshot)["pickers"][url]["overloaded"] == ["busy"]
    # Ten seconds later, nothing refused since: not overloaded now.
    later = dataclasses.replace(snapshot, taken_at=snapshot.taken_at + dt.timedelta(seconds=11))
    assert "overloaded" not in st.render(later)

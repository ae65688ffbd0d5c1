"""The models in triton_models/, served by a real tritonserver started from the nvidia-pytriton wheel.

One server with all four models serves the module; the service-time test starts a second one with only
``timed_batch`` and a slower factor. Expected values are recomputed here with numpy, independently of
the models' code.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from benchmarks.ports import free_ports
from extproc.runtime.triton import (
    TritonNotInstalledError,
    find_tritonserver,
    prepare_backend_dir,
    triton_command,
    triton_env,
)
from tests.models import F32, mlp_expected

pytestmark = pytest.mark.e2e

REPOSITORY = Path(__file__).resolve().parent.parent / "triton_models"
ALL_MODELS = ("mlp_classifier", "embed_normalize", "timed_batch", "seq_accumulate")
READY_DEADLINE_S = 60.0
PROTOCOLS = ("http", "grpc")


@dataclass(frozen=True)
class Triton:
    http_url: str
    grpc_url: str
    metrics_url: str
    log: Path
    process: subprocess.Popen[bytes]

    def client(self, protocol: str) -> Any:
        if protocol == "http":
            return httpclient.InferenceServerClient(self.http_url)
        return grpcclient.InferenceServerClient(self.grpc_url)


def _log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
    # The python backend stubs are tritonserver's children, in its own process group: reap stragglers.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=5)


@contextlib.contextmanager
def run_triton(
    workdir: Path, models: tuple[str, ...], service_time_factor: float, extra_env: dict[str, str] | None = None
) -> Iterator[Triton]:
    try:
        find_tritonserver()
    except TritonNotInstalledError as exc:
        pytest.skip(str(exc))
    http_port, grpc_port, metrics_port = free_ports(3)
    command = triton_command(
        model_repository=REPOSITORY,
        backend_dir=prepare_backend_dir(workdir),
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        models=models,
    )
    log = workdir / "tritonserver.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            env=triton_env(service_time_factor) | (extra_env or {}),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    triton = Triton(
        http_url=f"127.0.0.1:{http_port}",
        grpc_url=f"127.0.0.1:{grpc_port}",
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        log=log,
        process=process,
    )
    try:
        deadline = time.monotonic() + READY_DEADLINE_S
        while not _ready(triton.http_url):
            if process.poll() is not None:
                pytest.fail(
                    f"tritonserver exited with {process.returncode} before it was ready; log {log}:\n{_log_tail(log)}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"tritonserver not ready after {READY_DEADLINE_S:.0f} s; log {log}:\n{_log_tail(log)}")
            time.sleep(0.1)
        yield triton
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    with run_triton(tmp_path_factory.mktemp("triton"), ALL_MODELS, service_time_factor=1.0) as server:
        yield server


def infer(
    triton: Triton,
    protocol: str,
    model: str,
    inputs: dict[str, F32],
    **kwargs: Any,
) -> Any:
    module: Any = httpclient if protocol == "http" else grpcclient
    tensors = []
    for name, array in inputs.items():
        tensor = module.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    client = triton.client(protocol)
    try:
        return client.infer(model, tensors, **kwargs)
    finally:
        client.close()


# --- mlp_classifier ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mlp_classifier_matches_numpy(triton: Triton, protocol: str) -> None:
    x = np.random.default_rng(7).standard_normal((5, 16)).astype(np.float32) * 3
    result = infer(triton, protocol, "mlp_classifier", {"INPUT0": x})
    probs, labels = result.as_numpy("PROBS"), result.as_numpy("LABEL")
    want_probs, want_labels = mlp_expected(x)
    assert probs.dtype == np.float32
    assert labels.dtype == np.int64
    assert probs.shape == (5, 4)
    assert labels.shape == (5, 1)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(labels, want_labels)
    # The classes are not all the same: the weights do real work.
    assert len(set(want_labels.ravel().tolist())) > 1


# --- embed_normalize -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [8, 1024])
def test_embed_normalize_unit_norm(triton: Triton, dim: int) -> None:
    x = np.random.default_rng(dim).standard_normal((3, dim)).astype(np.float32) * 5
    result = infer(triton, "http", "embed_normalize", {"INPUT": x})
    out, norm = result.as_numpy("OUTPUT"), result.as_numpy("NORM")
    assert out.shape == (3, dim)
    assert norm.shape == (3, 1)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(norm[:, 0], np.linalg.norm(x.astype(np.float64), axis=1), rtol=1e-5)
    np.testing.assert_allclose(out * norm, x, rtol=1e-4, atol=1e-5)


def test_embed_normalize_zero_vector_has_no_nan(triton: Triton) -> None:
    x = np.zeros((2, 16), np.float32)
    x[1, 3] = -2.0
    result = infer(triton, "grpc", "embed_normalize", {"INPUT": x})
    out, norm = result.as_numpy("OUTPUT"), result.as_numpy("NORM")
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[0], 0.0)
    assert norm[0, 0] == 0.0
    assert norm[1, 0] == pytest.approx(2.0)
    assert out[1, 3] == pytest.approx(-1.0)


# --- timed_batch ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_timed_batch_output(triton: Triton, protocol: str) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    result = infer(triton, protocol, "timed_batch", {"INPUT0": x})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2 + 1)


def test_timed_batch_batches_concurrent_requests(triton: Triton) -> None:
    before = _quiet_stats(triton)
    done: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def on_done(result: Any, error: Any) -> None:
        done.put((result, error))

    # gRPC async_infer has all 16 in flight at once (tritonclient.http's async_infer, on geventhttpclient
    # without monkey-patching, sent them one after another here).
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        for i in range(16):
            tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.full((1, 4), i, np.float32))
            client.async_infer("timed_batch", [tensor], callback=on_done)
        answers = [done.get(timeout=10) for _ in range(16)]
    finally:
        client.close()
    assert [error for _, error in answers if error is not None] == []
    outputs = sorted(float(result.as_numpy("OUTPUT0")[0, 0]) for result, _ in answers)
    assert outputs == [2.0 * i + 1 for i in range(16)]
    after = _stats_when(triton, lambda st: st["inference_count"] - before["inference_count"] >= 16)
    assert after["inference_count"] - before["inference_count"] == 16
    # One instance taking >= 10 ms per execution: requests that arrive meanwhile are batched together.
    assert after["execution_count"] - before["execution_count"] < 16


def _stats(triton: Triton, model: str) -> dict[str, Any]:
    client = httpclient.InferenceServerClient(triton.http_url)
    try:
        stats: dict[str, Any] = client.get_inference_statistics(model)["model_stats"][0]
        return stats
    finally:
        client.close()


def _stats_when(triton: Triton, settled: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """timed_batch's statistics once ``settled`` holds for them (or after 5 s).

    Triton records a request's statistics just after it sends the response, so a client that has all
    its answers can still read counters that miss the last request.
    """
    deadline = time.monotonic() + 5
    while not settled(stats := _stats(triton, "timed_batch")) and time.monotonic() < deadline:
        time.sleep(0.02)
    return stats


def _quiet_stats(triton: Triton) -> dict[str, Any]:
    """timed_batch's statistics once they stop changing (or after 5 s).

    An earlier test's last request can be counted after its client has the answer (see ``_stats_when``),
    so a count read straight after it can miss that request and charge it to the next test.
    """
    deadline = time.monotonic() + 5
    stats = _stats(triton, "timed_batch")
    while time.monotonic() < deadline:
        time.sleep(0.1)
        again = _stats(triton, "timed_batch")
        if again == stats:
            return again
        stats = again
    return stats


def _compute(stats: dict[str, Any]) -> dict[str, int]:
    compute: dict[str, int] = stats["inference_stats"]["compute_infer"]
    return compute


def _mean_compute_ms(triton: Triton, requests: int) -> float:
    """Mean execute() time of ``requests`` sequential one-item timed_batch requests, from Triton's stats."""
    before = _compute(_quiet_stats(triton))
    x = np.ones((1, 4), np.float32)
    for _ in range(requests):
        infer(triton, "grpc", "timed_batch", {"INPUT0": x})
    after = _compute(_stats_when(triton, lambda st: _compute(st)["count"] - before["count"] >= requests))
    assert after["count"] - before["count"] == requests
    return float(after["ns"] - before["ns"]) / requests / 1e6


def test_service_time_factor_slows_timed_batch(triton: Triton, tmp_path: Path) -> None:
    requests = 4
    # One item per execution: (8 ms + 2 ms) x factor. sleep() gives lower bounds that noise cannot break;
    # noise (a busy machine) only makes an execution slower, so the fast host's bound is relative, and wide.
    # A factor far above what a busy machine adds to the fast host (it has taken 45 ms an execution).
    fast_ms = _mean_compute_ms(triton, requests)
    with run_triton(tmp_path, ("timed_batch",), service_time_factor=20.0) as slow:
        slow_ms = _mean_compute_ms(slow, requests)
    assert fast_ms >= 10.0 * 0.98
    assert slow_ms >= 200.0 * 0.98
    assert slow_ms > 2.0 * fast_ms, f"factor 1 took {fast_ms:.1f} ms per execution, factor 20 {slow_ms:.1f} ms"


def test_a_factor_written_to_the_speed_file_slows_timed_batch_while_it_runs(tmp_path: Path) -> None:
    """benchmarks.routing's slowdowns: the factor in EXTPROC_SERVICE_TIME_FILE replaces the launch one from
    the next execution on; a file that holds no valid factor keeps the last good one."""
    speed = tmp_path / "speed.txt"
    speed.write_text("1.0\n")
    with run_triton(tmp_path, ("timed_batch",), 1.0, {"EXTPROC_SERVICE_TIME_FILE": str(speed)}) as server:
        before_ms = _mean_compute_ms(server, 4)
        partial = tmp_path / "speed.partial"
        partial.write_text("20.0\n")  # far above what a busy machine adds to factor 1 (see the test above)
        partial.replace(speed)
        slowed_ms = _mean_compute_ms(server, 4)
        partial.write_text("fast please\n")
        partial.replace(speed)
        kept_ms = _mean_compute_ms(server, 4)
    # Lower bounds from sleep(); factor 1's bound is relative (see the test above).
    assert slowed_ms >= 200.0 * 0.98
    assert kept_ms >= 200.0 * 0.98
    assert slowed_ms > 2.0 * before_ms, f"factor 1 took {before_ms:.1f} ms per execution, factor 20 {slowed_ms:.1f} ms"


# --- seq_accumulate ------------------------------------------------------------------------------------


def _seq(triton: Triton, protocol: str, sequence_id: int, value: float, *, start: bool, end: bool) -> float:
    result = infer(
        triton,
        protocol,
        "seq_accumulate",
        {"INPUT": np.array([[value]], np.float32)},
        sequence_id=sequence_id,
        sequence_start=start,
        sequence_end=end,
    )
    out = result.as_numpy("OUTPUT")
    assert out.shape == (1, 1)
    return float(out[0, 0])


@pytest.mark.parametrize(("protocol", "base_id"), [("http", 1000), ("grpc", 2000)])
def test_seq_accumulate_sums_per_sequence(triton: Triton, protocol: str, base_id: int) -> None:
    a, b = base_id + 1, base_id + 2
    assert _seq(triton, protocol, a, 1.5, start=True, end=False) == 1.5
    assert _seq(triton, protocol, b, 10.0, start=True, end=False) == 10.0
    assert _seq(triton, protocol, a, 2.0, start=False, end=False) == 3.5
    assert _seq(triton, protocol, b, -1.0, start=False, end=False) == 9.0
    assert _seq(triton, protocol, a, 0.5, start=False, end=True) == 4.0
    # A new START on the same ID begins again from 0.
    assert _seq(triton, protocol, b, 7.0, start=True, end=True) == 7.0


@pytest.mark.parametrize(("protocol", "base_id"), [("http", 3000), ("grpc", 4000)])
def test_seq_accumulate_rejects_unknown_sequence(triton: Triton, protocol: str, base_id: int) -> None:
    # A continuation of a sequence this server never saw (it started on another server)...
    with pytest.raises(InferenceServerException, match="START"):
        _seq(triton, protocol, base_id + 1, 1.0, start=False, end=False)
    # ...and of one that has ended here.
    assert _seq(triton, protocol, base_id + 2, 1.0, start=True, end=True) == 1.0
    with pytest.raises(InferenceServerException, match="START"):
        _seq(triton, protocol, base_id + 2, 1.0, start=False, end=False)

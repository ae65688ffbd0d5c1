"""The fleet's admin key (extproc/admin_key.py): where it comes from, that the tools send it, and that the
Triton hosts ``extproc up`` launches refuse their control APIs without it (end to end, real stack)."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc

from benchmarks.ports import free_ports
from extproc.admin_key import (
    GRPC_HEADER,
    HEADER,
    ensure_admin_key,
    generated_key_file,
    read_admin_key,
    triton_flags,
)
from extproc.app import Picker
from extproc.config import ConfigError, Fleet, HostSpec, Tier, parse_fleet
from extproc.ops.triton_api import GrpcTriton, TritonError
from extproc.runtime.triton import triton_command
from extproc.telemetry.repository import RepositoryClient
from tests.stack import REPO, Stack, local_fleet, start_stack, stop_stack

KEY = "k" * 20


def fleet(tmp_path: Path, **top: Any) -> Fleet:
    hosts = [{"name": "a", "address": "127.0.0.1", "tier": "gpu"}]
    # Everything the picker writes stays in tmp_path: a fresh checkout has no .run/ for the default socket.
    picker = {"listen": f"unix:{tmp_path}/picker.sock", "metrics_port": free_ports(1)[0]}
    data = {"hosts": hosts, "runtime_dir": str(tmp_path), "picker": picker, **top}
    return parse_fleet(data, str(tmp_path / "fleet.yaml"))


# --- where the key comes from ------------------------------------------------------------------------------


def test_no_key_file_and_nothing_generated_means_no_key(tmp_path: Path) -> None:
    assert read_admin_key(fleet(tmp_path)) is None


def test_generated_once_owner_only_then_reused(tmp_path: Path) -> None:
    spec = fleet(tmp_path)
    key = ensure_admin_key(spec)
    path = generated_key_file(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= 32 and path.read_text() == key + "\n"
    assert ensure_admin_key(spec) == key
    assert read_admin_key(spec) == key


def test_admin_key_file_is_honoured_and_nothing_generated(tmp_path: Path) -> None:
    key_file = tmp_path / "secret" / "key"
    key_file.parent.mkdir()
    key_file.write_text(f"  {KEY}\n")
    spec = fleet(tmp_path, admin_key_file=str(key_file))
    assert ensure_admin_key(spec) == KEY
    assert read_admin_key(spec) == KEY
    assert not generated_key_file(tmp_path).exists()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),
        ("\n", "is empty"),
        ("short\n", "16 to 4096 visible ASCII characters"),
        ("two words that are long enough\n", "16 to 4096 visible ASCII characters"),
    ],
)
def test_unusable_admin_key_file_names_the_file_and_the_key(tmp_path: Path, content: str | None, problem: str) -> None:
    key_file = tmp_path / "admin-key"
    if content is not None:
        key_file.write_text(content)
    spec = fleet(tmp_path, admin_key_file=str(key_file))
    for resolve in (read_admin_key, ensure_admin_key):
        with pytest.raises(ConfigError) as raised:
            resolve(spec)
        message = str(raised.value)
        assert message.startswith(f"{tmp_path / 'fleet.yaml'}: key admin_key_file: ")
        assert str(key_file) in message and problem in message
        if content is not None and content.strip():
            assert content.strip() not in message  # never the key itself
    assert not generated_key_file(tmp_path).exists()


def test_an_emptied_generated_key_is_refused_not_replaced(tmp_path: Path) -> None:
    generated_key_file(tmp_path).write_text("")
    with pytest.raises(ConfigError, match=r"admin\.key is empty"):
        ensure_admin_key(fleet(tmp_path))


def test_admin_key_file_may_not_be_an_empty_string(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key admin_key_file"):
        fleet(tmp_path, admin_key_file="")


def test_a_command_refuses_to_start_on_a_missing_admin_key_file(tmp_path: Path) -> None:
    config = tmp_path / "fleet.yaml"
    hosts = [{"name": "a", "address": "127.0.0.1", "tier": "gpu"}]
    missing = tmp_path / "no-such-key"
    config.write_text(yaml.safe_dump({"hosts": hosts, "runtime_dir": str(tmp_path), "admin_key_file": str(missing)}))
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "models", "list", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{config}: key admin_key_file: cannot read {missing}" in result.stderr


async def test_the_picker_reads_the_key_at_start_and_a_reload_with_an_unusable_one_is_rejected(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text(KEY)
    second.write_text("s" * 16)
    config = fleet(tmp_path, admin_key_file=str(first))
    picker = Picker(config)
    try:
        assert picker.admin_key == KEY
        await picker.reload(fleet(tmp_path, admin_key_file=str(tmp_path / "missing")))
        assert picker.config is config and picker.admin_key == KEY
        await picker.reload(fleet(tmp_path, admin_key_file=str(second)))
        assert picker.admin_key == "s" * 16
    finally:
        await picker.stop()
    with pytest.raises(ConfigError, match="key admin_key_file: cannot read"):
        Picker(fleet(tmp_path, admin_key_file=str(tmp_path / "missing")))


def test_triton_command_restricts_the_control_apis_only_with_a_key(tmp_path: Path) -> None:
    def command(admin_key: str | None) -> list[str]:
        return triton_command(
            model_repository=tmp_path,
            backend_dir=tmp_path,
            http_port=1,
            grpc_port=2,
            metrics_port=3,
            models=["m"],
            admin_key=admin_key,
        )

    apis = "model-repository,shared-memory,logging,trace"
    assert triton_flags(KEY) == [
        f"--http-restricted-api={apis}:extproc-admin-key={KEY}",
        f"--grpc-restricted-protocol={apis}:extproc-admin-key={KEY}",
    ]
    assert command(KEY)[-2:] == triton_flags(KEY)
    assert not any("restricted" in arg for arg in command(None))


# --- the tools send it (a gRPC server that checks, as a restricted Triton does) ------------------------------


class RestrictedTriton(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Answers the repository API only when the request carries ``KEY``; records the key each call had."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, str | None]] = []

    async def _check(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        key = dict(context.invocation_metadata() or ()).get(GRPC_HEADER)
        self.keys.append((method, None if key is None else str(key)))
        if key != KEY:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"This protocol is restricted, expecting header '{GRPC_HEADER}'"
            )

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._check("index", context)
        model = service_pb2.RepositoryIndexResponse.ModelIndex(name="m", version="1", state="READY")
        return service_pb2.RepositoryIndexResponse(models=[model])

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._check("load", context)
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._check("unload", context)
        return service_pb2.RepositoryModelUnloadResponse()


async def test_the_picker_and_extproc_models_send_the_key() -> None:
    servicer = RestrictedTriton()
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    spec = HostSpec(name="a", address="127.0.0.1", grpc_port=port, http_port=1, metrics_port=2, tier=Tier.GPU)
    picker, keyless = RepositoryClient(spec.grpc_endpoint, KEY), RepositoryClient(spec.grpc_endpoint)
    ops, ops_keyless = GrpcTriton(KEY), GrpcTriton()
    try:
        assert (await picker.index(timeout_s=5.0)).ready == {"m": frozenset({"1"})}
        with pytest.raises(Exception, match="restricted"):
            await keyless.index(timeout_s=5.0)
        # The sync client blocks: off the loop that serves it.
        await asyncio.to_thread(ops.unload, spec, "m", 5.0)
        await asyncio.to_thread(ops.load, spec, "m", 5.0)
        assert [e.name for e in await asyncio.to_thread(ops.index, spec, 5.0)] == ["m"]
        with pytest.raises(TritonError, match="restricted"):
            await asyncio.to_thread(ops_keyless.unload, spec, "m", 5.0)
    finally:
        ops.close()
        ops_keyless.close()
        await picker.aclose()
        await keyless.aclose()
        await server.stop(None)
    assert servicer.keys == [
        ("index", KEY),
        ("index", None),
        ("unload", KEY),
        ("load", KEY),
        ("index", KEY),
        ("unload", None),
    ]


# --- end to end: the hosts `extproc up` launches ------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("admin-key")
    stack = start_stack(run_dir, local_fleet(run_dir))
    yield stack
    stop_stack(stack)


def admin_key(stack: Stack) -> str:
    return stack.admin_headers()[HEADER]


def http(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, str]:
    data = body if body is not None else (b"{}" if method == "POST" else None)
    request = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def host_url(stack: Stack, host: str) -> str:
    return f"http://127.0.0.1:{stack.host(host)['http_port']}"


def extproc(stack: Stack, *argv: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *argv, "--config", str(config or stack.run_dir / "fleet.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=180,
    )


@pytest.mark.e2e
def test_e2e_the_key_was_generated_owner_only(stack: Stack) -> None:
    path = generated_key_file(stack.run_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(admin_key(stack)) >= 32


@pytest.mark.e2e
def test_e2e_control_apis_refuse_a_request_without_the_key(stack: Stack) -> None:
    base = host_url(stack, "triton-a")
    unload = f"{base}/v2/repository/models/timed_batch/unload"
    for headers in ({}, {HEADER: "wrong-key-of-enough-length"}):
        status, body = http(unload, "POST", headers)
        assert status == 403, body
        assert json.loads(body) == {"error": f"This API is restricted, expecting header '{HEADER}'"}
    for method, path in (
        ("POST", "/v2/repository/index"),
        ("GET", "/v2/logging"),
        ("POST", "/v2/logging"),
        ("GET", "/v2/trace/setting"),
        ("GET", "/v2/systemsharedmemory/status"),
        ("GET", "/v2/cudasharedmemory/status"),
    ):
        assert http(f"{base}{path}", method)[0] == 403, path
    assert http(f"{base}/v2/models/timed_batch/ready")[0] == 200
    # Not restricted: health, metadata, config and statistics.
    assert http(f"{base}/v2/models/timed_batch/stats")[0] == 200
    assert http(f"{base}/v2/models/timed_batch/config")[0] == 200
    # With the key the API answers (the index: it changes nothing).
    assert http(f"{base}/v2/repository/index", "POST", stack.admin_headers())[0] == 200


@pytest.mark.e2e
def test_e2e_grpc_unload_without_the_key_fails(stack: Stack) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{stack.host('triton-a')['grpc_port']}")
    try:
        for headers in (None, {GRPC_HEADER: "wrong-key-of-enough-length"}):
            with pytest.raises(InferenceServerException, match=f"restricted, expecting header '{GRPC_HEADER}'"):
                client.unload_model("timed_batch", headers=headers, client_timeout=30)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_repository_index(client_timeout=30)
        assert client.is_model_ready("timed_batch")
        assert client.get_model_repository_index(headers={GRPC_HEADER: admin_key(stack)}, client_timeout=30).models
    finally:
        client.close()


@pytest.mark.e2e
def test_e2e_extproc_models_unload_and_load_with_the_key(stack: Stack) -> None:
    unload = extproc(stack, "models", "unload", "timed_batch", "--hosts", "triton-b")
    assert unload.returncode == 0, unload.stdout + unload.stderr
    assert http(f"{host_url(stack, 'triton-b')}/v2/models/timed_batch/ready")[0] != 200
    load = extproc(stack, "models", "load", "timed_batch", "--hosts", "triton-b")
    assert load.returncode == 0, load.stdout + load.stderr
    assert "triton-b: READY in the picker" in load.stdout
    assert http(f"{host_url(stack, 'triton-b')}/v2/models/timed_batch/ready")[0] == 200


@pytest.mark.e2e
def test_e2e_extproc_models_without_the_key_cannot_read_the_index(stack: Stack, tmp_path: Path) -> None:
    """The same fleet with another runtime_dir (no generated key there): every host refuses the index."""
    data = yaml.safe_load((stack.run_dir / "fleet.yaml").read_text())
    data["runtime_dir"] = str(tmp_path)
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump(data))
    result = extproc(stack, "models", "list", "--json", config=config)
    hosts = json.loads(result.stdout)["hosts"]
    assert set(hosts) == {"triton-a", "triton-b", "triton-c"}
    assert all("restricted" in str(h["error"]) for h in hosts.values()), hosts


@pytest.mark.e2e
def test_e2e_the_picker_still_sees_every_model_and_routes(stack: Stack) -> None:
    hosts = stack.picker_status()["hosts"]
    for host in stack.fleet["hosts"]:
        view = hosts[host["name"]]
        assert view["routable"] and set(host["launch"]["models"]) <= set(view["ready"]), view
    body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    status, answer = http(
        f"http://{stack.http_url}/v2/models/timed_batch/infer",
        "POST",
        {"content-type": "application/json"},
        body.encode(),
    )
    assert status == 200, answer
    assert json.loads(answer)["outputs"][0]["data"] == [3, 5, 7, 9]


@pytest.mark.e2e
def test_e2e_the_key_is_in_no_log_output_or_state_file(stack: Stack) -> None:
    """Last in this module: the logs then hold the refused and the accepted control calls above."""
    key = admin_key(stack)
    key_file = generated_key_file(stack.run_dir)
    checked = []
    for path in sorted(stack.run_dir.rglob("*")):
        if path.is_symlink() or not path.is_file() or path == key_file:
            continue
        assert key not in path.read_text(errors="replace"), f"the admin key is in {path}"
        checked.append(path.relative_to(stack.run_dir).as_posix())
    assert {"processes.json", "logs/picker.log", "logs/envoy.log", "logs/triton-a.log"} <= set(checked)
    assert stack.output and not any(key in line for line in stack.output)
    status_url = stack.metrics_url.replace("/metrics", "/status")
    with urllib.request.urlopen(status_url, timeout=5) as response:
        assert key not in response.read().decode()

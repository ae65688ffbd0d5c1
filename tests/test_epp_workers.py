"""``picker.workers: 2`` with ``picker.epp``: every worker serves the Endpoint Picker Protocol on the one TLS
port, with the certificate the leader made before starting them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from benchmarks.ports import free_ports
from extproc.datapath.headers import EPP_DESTINATION_HEADER
from tests.stack import Stack, children, local_fleet, start_stack, stop_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("epp-workers")
    epp_port, health_port = free_ports(2)
    epp = {
        "listen": f"127.0.0.1:{epp_port}",
        "health_port": health_port,
        "cert_file": str(run_dir / "tls/epp.crt"),
        "key_file": str(run_dir / "tls/epp.key"),
    }
    stack = start_stack(run_dir, local_fleet(run_dir, workers=2, epp=epp))
    yield stack
    stop_stack(stack)


def _listeners(port: int) -> int:
    """Sockets listening on loopback ``port``: /proc/net/tcp and tcp6 (gRPC binds a dual-stack socket, which
    shows there as ::ffff:127.0.0.1); local address in hex, state 0A is LISTEN."""
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, _, local_port = fields[1].partition(":")
            if address.endswith("0100007F") and int(local_port, 16) == port and fields[3] == "0A":
                count += 1
    return count


async def _ask(target: str, credentials: grpc.ChannelCredentials) -> str:
    """One readiness probe's routing, asked of the EPP port as a gateway would: the endpoints it names."""
    headers = [(":path", "/v2/models/embed_normalize/ready"), (":method", "GET")]
    first = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers]),
            end_of_stream=True,
        )
    )

    async def requests() -> AsyncIterator[ep.ProcessingRequest]:
        yield first

    async with grpc.aio.secure_channel(target, credentials) as channel:
        async for answer in ep_grpc.ExternalProcessorStub(channel).Process(requests(), timeout=10):
            mutation = answer.request_headers.response.header_mutation
            answered: dict[str, str] = {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
            return answered[EPP_DESTINATION_HEADER]
    raise AssertionError("no answer")


async def test_every_worker_serves_the_epp_port(stack: Stack) -> None:
    epp = stack.fleet["picker"]["epp"]
    port = int(epp["listen"].rpartition(":")[2])
    assert len(children(stack.pids()["picker"])) == 2
    assert _listeners(port) == 2, "each worker listens on the EPP port"
    assert _listeners(epp["health_port"]) == 2
    certificate = await asyncio.to_thread(Path(epp["cert_file"]).read_bytes)
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate)
    hosts = {f"127.0.0.1:{h['http_port']}": h["name"] for h in stack.fleet["hosts"]}
    for _ in range(6):  # a new connection each time: the kernel spreads them over the workers
        ranked = (await _ask(epp["listen"], credentials)).split(",")
        assert {hosts[e] for e in ranked} == {"triton-a", "triton-b"}  # where embed_normalize is

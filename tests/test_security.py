"""Security on the real stack: a client can never choose the upstream, only the fleet's hosts are reachable,
nothing listens beyond loopback by default, the TLS listener has modern settings and (here) requires client
certificates, TLS to Triton works and is verified, and nothing secret reaches a log.
"""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import ipaddress
import json
import os
import signal
import socket
import ssl
import stat
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tritonclient.grpc import service_pb2

from benchmarks.ports import envoy_base_id, free_ports
from extproc.config import EnvoySpec, PickerSpec, parse_fleet
from extproc.datapath.headers import HOSTS_HEADER, TIER_HEADER, UPSTREAM_HOST_HEADER
from extproc.envoy_config import render_bootstrap
from tests.stack import (
    Stack,
    TcpProxy,
    local_fleet,
    pid_of,
    start_envoy,
    start_stack,
    stop_stack,
    wait_for,
)

pytestmark = pytest.mark.e2e

GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
EMBED_BODY = json.dumps(
    {"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": [3.0, 4.0, 0.0, 0.0]}]}
).encode()
SECRET = "s3cr3t-7f1c9a2e-do-not-log"

# ------------------------------------------------------------------------------------------------- a PKI


@dataclass(frozen=True)
class Pki:
    ca: Path  # signs the clients' and the Triton hosts' certificates
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path
    triton_cert: Path  # DNS:triton.test, for a TLS sidecar in front of Triton
    triton_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    dns: Sequence[str] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    ca_key, rogue_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("test CA", ca_key, None, ca=True)
    rogue_ca_cert = _issue("rogue CA", rogue_ca_key, None, ca=True)
    ca, _ = _write(directory, "ca", ca_cert, ca_key)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    client = _issue("client", keys[0], (ca_cert.subject, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _issue("client", keys[1], (rogue_ca_cert.subject, rogue_ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    triton = _issue(
        "triton", keys[2], (ca_cert.subject, ca_key), usage=ExtendedKeyUsageOID.SERVER_AUTH, dns=["triton.test"]
    )
    client_cert, client_key = _write(directory, "client", client, keys[0])
    rogue_cert, rogue_key = _write(directory, "rogue", rogue, keys[1])
    triton_cert, triton_key = _write(directory, "triton", triton, keys[2])
    return Pki(ca, client_cert, client_key, rogue_cert, rogue_key, triton_cert, triton_key)


# ---------------------------------------------------------------------------------------------- fixtures


class Canary:
    """A loopback HTTP service outside the fleet that counts every request reaching it."""

    def __init__(self) -> None:
        hits: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(299)
                self.end_headers()

            do_POST = do_GET

            def log_message(self, *_: Any) -> None:
                pass

        self.hits = hits
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("security")
    fleet = local_fleet(run_dir)
    fleet["envoy"]["tls"].update(client_ca_file=str(pki.ca), require_client_certificate=True)
    stack = start_stack(run_dir, fleet)
    try:
        yield stack
    finally:
        stop_stack(stack)


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    service = Canary()
    yield service
    service.server.shutdown()


# ------------------------------------------------------------------------------------------------ helpers


def http1(
    stack: Stack, path: str, body: bytes | None, headers: Sequence[tuple[str, str]] = (), method: str = "POST"
) -> tuple[int, dict[str, str], bytes]:
    host, port = stack.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in headers:
            conn.putheader(key, value)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def grpc_infer_host(stack: Stack, metadata: Sequence[tuple[str, str]]) -> str:
    request = service_pb2.ModelInferRequest(model_name="embed_normalize")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\0" * 16)
    with grpc.insecure_channel(stack.http_url) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(GRPC_INFER)
        _, info = call.with_call(request.SerializeToString(), metadata=tuple(metadata), timeout=20)
        assert isinstance(info, grpc.Call)
        return str(dict(info.initial_metadata())[UPSTREAM_HOST_HEADER])


def gpu_endpoints(stack: Stack) -> set[str]:
    return {
        f"127.0.0.1:{h[port]}"
        for h in stack.fleet["hosts"]
        if h["tier"] == "gpu"
        for port in ("http_port", "grpc_port")
    }


def hostile_targets(stack: Stack, canary: Canary) -> list[str]:
    """Upstreams a client might try to name: outside the fleet, or in the fleet but in the wrong tier."""
    admin = stack.fleet["envoy"]["admin"]["port"]
    picker_metrics = stack.fleet["picker"]["metrics_port"]
    cpu = next(h for h in stack.fleet["hosts"] if h["tier"] == "cpu")
    return [
        f"127.0.0.1:{canary.port}",
        f"[::1]:{canary.port}",
        f"127.0.0.1:{admin}",
        f"127.0.0.1:{picker_metrics}",
        "169.254.169.254:80",
        "0.0.0.0:22",
        f"127.0.0.1:{cpu['http_port']}",
        f"127.0.0.1:{cpu['grpc_port']}",
    ]


def spellings(targets: list[str]) -> list[list[tuple[str, str]]]:
    """The routing headers in every case, repeated, comma-joined, padded, with conflicting tiers."""
    joined = ",".join(targets)
    return [
        [(HOSTS_HEADER, joined), (TIER_HEADER, "cpu")],
        [(HOSTS_HEADER.upper(), joined), (TIER_HEADER.upper(), "CPU")],
        [("X-Triton-Lb-Hosts", targets[0]), ("X-Triton-LB-Tier", "cpu")],
        [(HOSTS_HEADER, t) for t in targets] + [(TIER_HEADER, "cpu"), (TIER_HEADER, "gpu")],
        [(HOSTS_HEADER, f"  {joined}  "), (TIER_HEADER, " cpu ")],
        [(HOSTS_HEADER, ""), (HOSTS_HEADER, joined), (TIER_HEADER, "")],
        # Envoy-internal routing headers a client must not be able to use either.
        [("x-envoy-original-dst-host", targets[0]), ("x-envoy-upstream-alt-stat-name", "x"), (TIER_HEADER, "cpu")],
    ]


def assert_never_routed_by_client(stack: Stack, canary: Canary) -> int:
    """Requests naming hostile upstreams are served by the GPU-tier hosts embed_normalize lives on, REST and
    gRPC; the canary never sees one. Returns the number of requests sent."""
    targets = hostile_targets(stack, canary)
    allowed = gpu_endpoints(stack)

    def one_spelling(headers: list[tuple[str, str]]) -> int:
        status, response, body = http1(stack, "/v2/models/embed_normalize/infer", EMBED_BODY, headers)
        assert status == 200, (headers, body)
        assert response[UPSTREAM_HOST_HEADER] in allowed, (headers, response)
        grpc_metadata = [(k.lower(), v.strip() or "x") for k, v in headers]
        assert grpc_infer_host(stack, grpc_metadata) in allowed, headers
        # Requests that name no model go to the fallback tier's hosts as well.
        status, response, _ = http1(stack, "/v2/health/ready", None, [*headers, ("host", targets[0])], "GET")
        assert status == 200 and response[UPSTREAM_HOST_HEADER] in allowed, (headers, response)
        return 3

    # Spellings side by side: with the picker stopped, each request first waits out Envoy's message timeout.
    with ThreadPoolExecutor(8) as pool:
        sent = sum(pool.map(one_spelling, spellings(targets)))
    assert canary.hits == []
    return sent


# ------------------------------------------------------------------------------------------------- routing


def test_client_cannot_choose_the_upstream(stack: Stack, canary: Canary) -> None:
    assert assert_never_routed_by_client(stack, canary) > 0


def test_client_cannot_choose_the_upstream_while_the_picker_is_stalled(stack: Stack, canary: Canary) -> None:
    """With the picker stopped, requests fail open to the fallback tier; the client's headers still do not
    route them (they are stripped before the picker, not by it)."""
    pid = pid_of(stack, "picker")
    os.kill(pid, signal.SIGSTOP)
    try:
        assert_never_routed_by_client(stack, canary)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_admin_paths_and_foreign_targets_are_not_proxied(stack: Stack, canary: Canary) -> None:
    """Envoy's admin API is not reachable through the gateway, and absolute-form or CONNECT requests for
    another address do not reach it."""
    for path in ("/stats", "/clusters", "/config_dump", "/quitquitquit", "/healthcheck/fail", "/runtime_modify"):
        status, _, body = http1(stack, path, b"")
        assert status == 404 and "no route" in json.loads(body)["error"], path
    host, port = stack.http_url.split(":")
    for request in (
        f"GET http://127.0.0.1:{canary.port}/v2/health/ready HTTP/1.1\r\nhost: 127.0.0.1:{canary.port}\r\n\r\n",
        f"CONNECT 127.0.0.1:{canary.port} HTTP/1.1\r\nhost: 127.0.0.1:{canary.port}\r\n\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(request.encode())
            answer = sock.recv(65536).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 "), answer
        status = int(answer.split()[1])
        assert status == 404 or (status == 200 and f"{UPSTREAM_HOST_HEADER}: 127.0.0.1:" in answer), answer
    assert canary.hits == []


def test_envoy_control_headers_from_clients_are_ignored(stack: Stack) -> None:
    """Clients are external to Envoy (use_remote_address): x-envoy-* request headers have no effect."""
    body = json.dumps(
        {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
    ).encode()
    headers = [
        ("x-envoy-upstream-rq-timeout-ms", "1"),
        ("x-envoy-upstream-rq-per-try-timeout-ms", "1"),
        ("x-envoy-max-retries", "100"),
        ("x-envoy-retry-on", "5xx"),
    ]
    for _ in range(5):
        status, _, answer = http1(stack, "/v2/models/timed_batch/infer", body, headers)
        assert status == 200, answer  # timed_batch takes ≥ 8 ms: a 1 ms timeout would be a 504


# ----------------------------------------------------------------------------------------------- listeners


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", 4), ("tcp6", 6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(address_hex)
            if family == 4:
                address = str(ipaddress.IPv4Address(raw[::-1]))
            else:
                v6 = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
                address = str(v6.ipv4_mapped or v6)  # ::ffff:127.0.0.1 is IPv4's loopback on a v6 socket
            found.append((address, int(port_hex, 16)))
    return found


def test_defaults_bind_loopback_only() -> None:
    envoy, picker = EnvoySpec(), PickerSpec()
    assert envoy.listener.address == "127.0.0.1" and envoy.admin.address == "127.0.0.1"
    assert picker.metrics_address == "127.0.0.1"
    assert picker.listen.startswith("unix:"), "the picker's default is a Unix socket, not TCP"
    assert envoy.tls is not None and not envoy.tls.require_client_certificate  # opt-in


def test_running_processes_listen_on_loopback_only(stack: Stack) -> None:
    loopback = {"127.0.0.1", "::1"}
    for name in ("envoy", "picker", "triton-a", "triton-b", "triton-c"):
        sockets = listening_sockets(pid_of(stack, name))
        assert sockets, f"{name} listens on nothing?"
        assert {address for address, _ in sockets} <= loopback, (name, sockets)
    picker_ports = {port for _, port in listening_sockets(pid_of(stack, "picker"))}
    assert picker_ports == {stack.fleet["picker"]["metrics_port"]}, "the picker's gRPC service is not on TCP"


def test_picker_socket_is_owner_only(stack: Stack) -> None:
    path = Path(stack.fleet["picker"]["listen"].removeprefix("unix:"))
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert mode & 0o077 == 0, f"{path} is {stat.filemode(mode)}"
    assert path.stat().st_uid == os.getuid()


# ----------------------------------------------------------------------------------------- downstream TLS


def tls_context(
    stack: Stack,
    pki: Pki,
    *,
    cert: tuple[Path, Path] | None = None,
    version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=stack.cert_file)
    if cert is not None:
        context.load_cert_chain(*cert)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def tls_get(stack: Stack, context: ssl.SSLContext, path: str = "/v2/health/ready") -> tuple[int, str | None]:
    """GET over TLS with ``context``; returns the status and the negotiated ALPN (HTTP/1.1 is spoken even
    when h2 is negotiated; such a probe only reports the ALPN)."""
    host, port = stack.tls_url.split(":")
    with (
        socket.create_connection((host, int(port)), timeout=20) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        alpn = sock.selected_alpn_protocol()
        if alpn == "h2":
            return 0, alpn
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split()[1]), alpn


def refused(stack: Stack, context: ssl.SSLContext) -> bool:
    """The TLS listener refuses the handshake, or (TLS 1.3: the client certificate is checked after the
    client's side of the handshake) the first exchange."""
    try:
        status, _ = tls_get(stack, context)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, IndexError):
        return True
    return status == 0


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_modern_settings(stack: Stack, pki: Pki) -> None:
    client = (pki.client_cert, pki.client_key)
    assert tls_get(stack, tls_context(stack, pki, cert=client, version=ssl.TLSVersion.TLSv1_3))[1] == "h2"
    http11 = tls_context(
        stack, pki, cert=client, version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"
    )
    http11.set_alpn_protocols(["http/1.1"])
    assert tls_get(stack, http11) == (200, "http/1.1")
    # TLS 1.2 with a CBC/SHA-1 suite the listener does not allow (the client offers only that one).
    weak = tls_context(stack, pki, cert=client, version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA")
    with pytest.raises(ssl.SSLError, match=r"HANDSHAKE_FAILURE|handshake failure|NO_SHARED_CIPHER"):
        tls_get(stack, weak)
    # TLS 1.1 (deprecated, RFC 8996), if this client can still offer it at all.
    old = ssl.create_default_context(cafile=stack.cert_file)
    try:
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot offer TLS 1.1")
    with pytest.raises(ssl.SSLError) as info:
        tls_get(stack, old)
    if "NO_PROTOCOLS_AVAILABLE" in str(info.value) or "no protocols available" in str(info.value):
        pytest.skip("this OpenSSL cannot offer TLS 1.1")
    assert "PROTOCOL_VERSION" in str(info.value) or "protocol version" in str(info.value), info.value


def test_client_certificate_is_required(stack: Stack, pki: Pki) -> None:
    assert refused(stack, tls_context(stack, pki))
    assert refused(stack, tls_context(stack, pki, cert=(pki.rogue_cert, pki.rogue_key)))
    good = tls_context(stack, pki, cert=(pki.client_cert, pki.client_key), version=ssl.TLSVersion.TLSv1_2)
    good.set_alpn_protocols(["http/1.1"])
    assert tls_get(stack, good)[0] == 200
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(stack.cert_file).read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(stack.tls_url, credentials, options=options) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(GRPC_INFER)
        request = service_pb2.ModelInferRequest(model_name="embed_normalize")
        request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(b"\0" * 16)
        call(request.SerializeToString(), timeout=20)


def test_client_certificate_settings_render() -> None:
    """Without client_ca_file nothing about client certificates is rendered; with it, Envoy verifies them."""
    hosts = [{"name": "g", "address": "10.0.0.1", "tier": "gpu"}]

    def tls_of(tls: dict[str, Any]) -> dict[str, Any]:
        config = render_bootstrap(parse_fleet({"hosts": hosts, "envoy": {"tls": tls}}))
        https = config["static_resources"]["listeners"][1]
        typed: dict[str, Any] = https["filter_chains"][0]["transport_socket"]["typed_config"]
        return typed

    plain = tls_of({})
    assert "require_client_certificate" not in plain and "validation_context" not in plain["common_tls_context"]
    optional = tls_of({"client_ca_file": "/etc/ca.pem"})
    assert optional["common_tls_context"]["validation_context"]["trusted_ca"] == {"filename": "/etc/ca.pem"}
    assert "require_client_certificate" not in optional
    assert tls_of({"client_ca_file": "/etc/ca.pem", "require_client_certificate": True})["require_client_certificate"]
    with pytest.raises(Exception, match="client_ca_file"):
        parse_fleet({"hosts": hosts, "envoy": {"tls": {"require_client_certificate": True}}})


# ------------------------------------------------------------------------------------------- upstream TLS


def sidecar_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.triton_cert, pki.triton_key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def lone_envoy_fleet(
    stack: Stack, run_dir: Path, http_port: int, grpc_port: int, server_name: str, ca: Path
) -> dict[str, Any]:
    a = stack.host("triton-a")
    listener, admin = free_ports(2)
    return {
        "hosts": [
            {
                "name": "tls-a",
                "address": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_port": a["metrics_port"],
                "tier": "gpu",
            }
        ],
        # No picker: Envoy fails open to least request over the cluster, which is what is tested here.
        "picker": {"listen": f"unix:{run_dir}/no-picker.sock"},
        "envoy": {
            "listener": {"address": "127.0.0.1", "port": listener},
            "admin": {"address": "127.0.0.1", "port": admin},
            "tls": None,
            "expose_upstream_host": True,
            "base_id": envoy_base_id(),
            "upstream_tls": {"ca_file": str(ca), "server_name": server_name},
        },
    }


def test_tls_to_triton_upstreams(stack: Stack, pki: Pki, tmp_path: Path) -> None:
    """Envoy with envoy.upstream_tls in front of a TLS sidecar (a TLS-terminating proxy) for a real Triton:
    REST and gRPC work, every connection to the sidecar is TLS, and a certificate that does not name
    server_name is refused."""
    a = stack.host("triton-a")
    http_port, grpc_port = free_ports(2)
    sidecars = [
        TcpProxy(http_port, a["http_port"], tls=sidecar_context(pki)),
        TcpProxy(grpc_port, a["grpc_port"], tls=sidecar_context(pki)),
    ]
    for sidecar in sidecars:
        sidecar.start()
    try:
        fleet = lone_envoy_fleet(stack, tmp_path / "good", http_port, grpc_port, "triton.test", pki.ca)
        envoy = start_envoy(tmp_path / "good", fleet)
        try:
            gateway = f"127.0.0.1:{fleet['envoy']['listener']['port']}"
            admin = f"http://127.0.0.1:{fleet['envoy']['admin']['port']}"
            wait_for(lambda: _healthy_hosts(admin) == 2, 30, "the TLS upstreams to pass health checks")
            request = urllib.request.Request(f"http://{gateway}/v2/models/embed_normalize/infer", data=EMBED_BODY)
            with urllib.request.urlopen(request, timeout=20) as response:
                assert response.status == 200
                assert response.headers[UPSTREAM_HOST_HEADER] == f"127.0.0.1:{http_port}"
            with grpc.insecure_channel(gateway) as channel:
                call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(GRPC_INFER)
                message = service_pb2.ModelInferRequest(model_name="embed_normalize")
                message.inputs.add(name="INPUT", datatype="FP32", shape=[1, 4])
                message.raw_input_contents.append(b"\0" * 16)
                call(message.SerializeToString(), timeout=20)
            assert all(s.handshakes > 0 for s in sidecars)
        finally:
            envoy.send_signal(signal.SIGTERM)
            envoy.wait(30)

        wrong = lone_envoy_fleet(stack, tmp_path / "wrong", http_port, grpc_port, "other.test", pki.ca)
        envoy = start_envoy(tmp_path / "wrong", wrong)
        try:
            gateway = f"127.0.0.1:{wrong['envoy']['listener']['port']}"
            request = urllib.request.Request(f"http://{gateway}/v2/models/embed_normalize/infer", data=EMBED_BODY)
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=20)
            assert info.value.code == 503
            admin = f"http://127.0.0.1:{wrong['envoy']['admin']['port']}"
            assert _healthy_hosts(admin) == 0
        finally:
            envoy.send_signal(signal.SIGTERM)
            envoy.wait(30)
    finally:
        for sidecar in sidecars:
            sidecar.stop()


def _healthy_hosts(admin: str) -> int:
    with urllib.request.urlopen(f"{admin}/clusters", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(1 for line in lines if line.startswith("triton_gpu_") and line.endswith("::health_flags::healthy"))


def test_upstream_tls_renders_only_when_set() -> None:
    hosts = [{"name": "g", "address": "10.0.0.1", "tier": "gpu"}]
    plain = render_bootstrap(parse_fleet({"hosts": hosts}))
    assert all("transport_socket" not in c for c in plain["static_resources"]["clusters"])
    upstream = {"ca_file": "/ca.pem", "server_name": "triton.internal", "cert_file": "/c.pem", "key_file": "/k.pem"}
    config = render_bootstrap(parse_fleet({"hosts": hosts, "envoy": {"upstream_tls": upstream}}))
    for cluster in config["static_resources"]["clusters"]:
        if not cluster["name"].startswith("triton_"):
            assert "transport_socket" not in cluster  # the picker's Unix socket
            continue
        context = cluster["transport_socket"]["typed_config"]
        assert context["sni"] == "triton.internal"
        common = context["common_tls_context"]
        assert common["alpn_protocols"] == (["h2"] if cluster["name"].endswith("_grpc") else ["http/1.1"])
        assert common["validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {
            "exact": "triton.internal"
        }
        assert common["tls_certificates"][0]["certificate_chain"] == {"filename": "/c.pem"}
    with pytest.raises(Exception, match="go together"):
        parse_fleet({"hosts": hosts, "envoy": {"upstream_tls": {**upstream, "key_file": None}}})


# ---------------------------------------------------------------------------------------------------- logs


def test_nothing_secret_in_logs(stack: Stack, pki: Pki) -> None:
    headers = [
        ("authorization", f"Bearer {SECRET}"),
        ("cookie", f"session={SECRET}"),
        ("x-api-key", SECRET),
        ("proxy-authorization", f"Basic {SECRET}"),
    ]
    for path in (f"/v2/models/embed_normalize/infer?token={SECRET}", "/v2/models/no_such_model/infer"):
        http1(stack, path, EMBED_BODY, headers)
    http1(stack, "/v2/models/%ff/infer", EMBED_BODY, headers)  # a rejection, logged by the picker
    grpc_infer_host(stack, [(k, v) for k, v in headers if k != "proxy-authorization"])
    good = tls_context(stack, pki, cert=(pki.client_cert, pki.client_key), version=ssl.TLSVersion.TLSv1_2)
    good.set_alpn_protocols(["http/1.1"])
    tls_get(stack, good, f"/v2/health/ready?token={SECRET}")
    private_keys = [
        Path(stack.fleet["envoy"]["tls"]["key_file"]).read_text(),
        pki.client_key.read_text(),
    ]
    texts = {log.name: log.read_text(errors="replace") for log in (stack.run_dir / "logs").iterdir()}
    for url in (stack.metrics_url, stack.metrics_url.replace("/metrics", "/status")):
        with urllib.request.urlopen(url, timeout=5) as response:
            texts[url] = response.read().decode()
    assert texts
    for name, text in texts.items():
        assert SECRET not in text, name
        assert "PRIVATE KEY" not in text, name
        for key in private_keys:
            body = "".join(key.splitlines()[1:-1])
            assert body[:40] not in text.replace("\n", ""), name

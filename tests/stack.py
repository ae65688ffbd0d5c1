"""Start the real local stack (Triton hosts, picker, Envoy) with ``extproc up`` on free loopback ports."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
REPOSITORY = REPO / "triton_models"
READY_TIMEOUT_S = 240.0


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_fleet(run_dir: Path, **picker: Any) -> dict[str, Any]:
    """The local fleet (deploy/local/fleet.yaml) moved to free ports and a private run directory."""
    data: dict[str, Any] = yaml.safe_load((REPO / "deploy" / "local" / "fleet.yaml").read_text())
    ports = iter(free_ports(3 * len(data["hosts"]) + 4))
    for host in data["hosts"]:
        host.update(http_port=next(ports), grpc_port=next(ports), metrics_port=next(ports))
    data["model_repository"] = str(REPOSITORY)
    data["runtime_dir"] = str(run_dir)
    data["picker"].update(listen=f"unix:{run_dir}/picker.sock", metrics_port=next(ports), log_level="debug")
    data["picker"].update(picker)
    envoy = data["envoy"]
    envoy["listener"]["port"] = next(ports)
    envoy["admin"]["port"] = next(ports)
    tls = {"cert_file": str(run_dir / "tls/server.crt"), "key_file": str(run_dir / "tls/server.key")}
    envoy["tls"].update(port=next(ports), **tls)
    # Distinct from `make run`'s Envoy, so tests can run beside it.
    envoy["base_id"] = 100 + os.getpid() % 1000
    return data


@dataclass
class Stack:
    fleet: dict[str, Any]
    run_dir: Path
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.fleet['envoy']['listener']['port']}"

    @property
    def tls_url(self) -> str:
        return f"127.0.0.1:{self.fleet['envoy']['tls']['port']}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.fleet['envoy']['admin']['port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.fleet['picker']['metrics_port']}/metrics"

    @property
    def cert_file(self) -> str:
        return str(self.fleet["envoy"]["tls"]["cert_file"])

    def host(self, name: str) -> dict[str, Any]:
        for host in self.fleet["hosts"]:
            if host["name"] == name:
                return dict(host)
        raise KeyError(name)

    def host_by_http_endpoint(self) -> dict[str, str]:
        return {f"127.0.0.1:{h['http_port']}": h["name"] for h in self.fleet["hosts"]}

    def pids(self) -> dict[str, int]:
        data = json.loads((self.run_dir / "processes.json").read_text())
        return {str(k): int(v) for k, v in data.items()}

    def picker_status(self) -> dict[str, Any]:
        """The picker's own view of the fleet (``/status``), for failure messages."""
        url = self.metrics_url.replace("/metrics", "/status")
        with urllib.request.urlopen(url, timeout=5) as response:
            status: dict[str, Any] = json.load(response)
        return status

    def log(self, name: str) -> str:
        return (self.run_dir / "logs" / f"{name}.log").read_text(errors="replace")


def start_stack(run_dir: Path, fleet: dict[str, Any]) -> Stack:
    config = run_dir / "fleet.yaml"
    config.write_text(yaml.safe_dump(fleet, sort_keys=False))
    process = subprocess.Popen(
        [sys.executable, "-m", "extproc", "up", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    stack = Stack(fleet, run_dir, process)
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not selector.select(timeout=1.0):
            continue
        line = process.stdout.readline()
        if not line:
            break
        stack.output.append(line.rstrip())
        if line.startswith("READY "):
            return stack
    stop_stack(stack)
    raise RuntimeError("extproc up did not print READY:\n" + "\n".join(stack.output[-40:]))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def stop_stack(stack: Stack) -> int:
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGTERM)
    try:
        return stack.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        stack.process.kill()
        return stack.process.wait()

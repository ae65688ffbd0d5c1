"""The control token (extproc/control.py): which fleet files need one, reading it, checking a request's
header, ``extproc models`` reading it; then a real picker process on the pod-style wildcard address that
refuses an unauthenticated drain and accepts an authenticated one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.ports import free_ports
from extproc.cli import _parser
from extproc.config import ConfigError, parse_fleet
from extproc.control import authorized, read_control_token
from extproc.ops import models as m
from extproc.ops.status import HttpPicker, PickerError
from tests.stack import REPO

TOKEN = "s3cret-token-0123456789"


def fleet_data(**picker: Any) -> dict[str, Any]:
    return {"hosts": [{"name": "h", "address": "127.0.0.1", "tier": "gpu"}], "picker": picker}


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "10.1.2.3", "picker.example"])
def test_an_endpoint_beyond_loopback_needs_a_token_file(address: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_fleet(fleet_data(metrics_address=address), "fleet.yaml")
    message = str(info.value)
    assert message.startswith("fleet.yaml: key picker: ")
    assert f"metrics_address {address!r} listens beyond loopback: set control_token_file" in message
    fleet = parse_fleet(fleet_data(metrics_address=address, control_token_file="/run/token"))
    assert not fleet.picker.metrics_on_loopback


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_token_file(address: str) -> None:
    fleet = parse_fleet(fleet_data(metrics_address=address))
    assert fleet.picker.metrics_on_loopback and read_control_token(fleet) is None


def test_reading_the_token_names_the_file_key_and_problem(tmp_path: Path) -> None:
    path = tmp_path / "token"
    fleet = parse_fleet(fleet_data(control_token_file=str(path)), "fleet.yaml")
    problems = {
        None: "cannot read",
        "  \n": "is empty",
        "short": "got 5 characters",
        "two words here, long enough": "no spaces",
    }
    for content, problem in problems.items():
        if content is not None:
            path.write_text(content)
        with pytest.raises(ConfigError, match=problem) as info:
            read_control_token(fleet)
        assert str(info.value).startswith("fleet.yaml: key picker.control_token_file: ")
        assert str(path) in str(info.value)
        assert "two words" not in str(info.value)  # never the file's content
    path.write_text(TOKEN + "\n")
    assert read_control_token(fleet) == TOKEN


def test_authorized_needs_the_bearer_scheme_and_the_exact_token() -> None:
    assert authorized(f"Bearer {TOKEN}", TOKEN)
    assert authorized(f"bearer {TOKEN}", TOKEN)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer "):
        assert not authorized(header, TOKEN), header


def test_models_command_reads_the_token_before_acting(tmp_path: Path) -> None:
    fleet = parse_fleet(fleet_data(control_token_file=str(tmp_path / "missing")), "fleet.yaml")
    args = _parser().parse_args(["models", "unload", "x", "--hosts", "h"])
    with pytest.raises(ConfigError, match=r"key picker\.control_token_file: cannot read .*missing"):
        m.run_cli(args, fleet)


# --- a real picker process ---------------------------------------------------------------------------------


def _post(url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    request = urllib.request.Request(url, method="POST", data=b"", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response), ""
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers.get("WWW-Authenticate", "")


@pytest.fixture
def picker_on_all_addresses(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``extproc serve`` with its HTTP endpoint on 0.0.0.0, as in the Kubernetes manifests; its one host
    does not exist (drain needs none)."""
    metrics_port, *host_ports = free_ports(4)
    (tmp_path / "token").write_text(TOKEN + "\n")
    fleet = {
        "hosts": [
            {"name": "h", "address": "127.0.0.1", "tier": "gpu"}
            | dict(zip(("http_port", "grpc_port", "metrics_port"), host_ports, strict=True))
        ],
        "runtime_dir": str(tmp_path),
        "picker": {
            "listen": f"unix:{tmp_path}/picker.sock",
            "metrics_address": "0.0.0.0",
            "metrics_port": metrics_port,
            "control_token_file": str(tmp_path / "token"),
        },
    }
    config = tmp_path / "fleet.yaml"
    config.write_text(json.dumps(fleet))
    command = [sys.executable, "-m", "extproc", "--log-format", "json", "serve", "--config", str(config)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{metrics_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/status", timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, process.communicate()[1].decode()
                assert time.monotonic() < deadline, "the picker did not answer /status"
                time.sleep(0.2)
        yield url, tmp_path / "token"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.e2e
def test_drain_beyond_loopback_needs_the_token(picker_on_all_addresses: tuple[str, Path]) -> None:
    url, token_file = picker_on_all_addresses
    for headers in ({}, {"Authorization": "Bearer not-the-token-at-all"}):
        code, doc, challenge = _post(f"{url}/hosts/h/drain", headers)
        assert (code, challenge) == (401, "Bearer"), doc
        assert "Authorization: Bearer" in doc["error"]
    with pytest.raises(PickerError, match="HTTP 401"):
        HttpPicker(url).drain("h")
    picker = HttpPicker(url, control_token=TOKEN)
    assert not picker.status().hosts["h"].draining  # reads stay open
    assert picker.drain("h") is True
    assert picker.status().hosts["h"].draining
    assert picker.undrain("h") is False
    # A Secret whose rotation broke the file: refused (closed), not opened.
    token_file.unlink()
    with pytest.raises(PickerError, match="HTTP 503: the picker cannot read its control token"):
        picker.drain("h")


@pytest.mark.e2e
def test_picker_refuses_to_start_without_its_token(tmp_path: Path) -> None:
    config = tmp_path / "fleet.yaml"
    picker = {"metrics_address": "0.0.0.0", "control_token_file": str(tmp_path / "absent")}
    config.write_text(
        json.dumps(fleet_data(listen=f"unix:{tmp_path}/p.sock", **picker) | {"runtime_dir": str(tmp_path)})
    )
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{config}: key picker.control_token_file: cannot read {tmp_path}/absent" in result.stderr

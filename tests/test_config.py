"""The fleet file: valid files load; invalid ones are refused with the file, key and problem named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import ConfigError, Tier, load_fleet, parse_fleet

LOCAL = Path(__file__).parent.parent / "deploy" / "local" / "fleet.yaml"


def local_data() -> dict[str, Any]:
    data = yaml.safe_load(LOCAL.read_text())
    assert isinstance(data, dict)
    return data


def test_local_fleet_loads() -> None:
    fleet = load_fleet(LOCAL)
    assert [h.name for h in fleet.hosts] == ["triton-a", "triton-b", "triton-c"]
    assert fleet.tiers == (Tier.CPU, Tier.GPU)
    mlp = fleet.model("mlp_classifier")
    assert mlp is not None and mlp.default_tier is Tier.CPU
    assert fleet.picker.unix_socket == Path(".run/picker.sock")


@pytest.mark.parametrize(
    ("mutate", "key", "problem"),
    [
        (lambda d: d["hosts"][1].update(grpc_port=70000), "hosts[1].grpc_port", "less than or equal to 65535"),
        (lambda d: d["hosts"][0].update(address="triton.example"), "hosts[0].address", "not an IP address"),
        (lambda d: d["hosts"][0].update(tier="tpu"), "hosts[0].tier", "'cpu' or 'gpu'"),
        (lambda d: d["hosts"][2].update(http_port=8001, address="127.0.0.1"), "(top level)", "both use"),
        (lambda d: d["hosts"][1].update(name="triton-a"), "(top level)", "repeated: ['triton-a']"),
        (lambda d: d["picker"].update(bogus=1), "picker.bogus", "Extra inputs are not permitted"),
        (lambda d: d["picker"].update(listen="nowhere"), "picker.listen", "neither unix:PATH nor HOST:PORT"),
        (lambda d: d["models"][2].update(tiers=["gpu"], rules=[{"tier": "cpu"}]), "models[2]", "not in tiers"),
        (lambda d: d["models"][0]["rules"][0].update(min_bytes=-1), "models[0].rules[0].min_bytes", "greater"),
        (lambda d: d["picker"]["profile"].update(scorers={"gpu_memory": 0}), "picker.profile", "above 0"),
        (lambda d: d["picker"]["profile"].update(filters=["fresh"]), "picker.profile", "include model_ready"),
        (lambda d: d["picker"]["profile"].update(picker="best"), "picker.profile.picker", "'argmax'"),
        (lambda d: d["picker"]["profile"].update(scorers={"speed": 1}), "picker.profile.scorers.speed", "Input"),
        (lambda d: d.update(hosts=[]), "hosts", "at least 1 item"),
        (lambda d: d["envoy"].update(fallback_tier="cpu", foo=1), "envoy.foo", "Extra inputs"),
        (lambda d: d["picker"].update(nvml_host="nope"), "(top level)", "not a host of this fleet"),
    ],
)
def test_invalid_fleet_names_file_key_and_problem(mutate: Any, key: str, problem: str) -> None:
    data = local_data()
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_fleet(data, "fleet.yaml")
    message = str(info.value)
    assert f"fleet.yaml: key {key}:" in message
    assert problem in message


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_fleet(bad)
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        load_fleet(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_fleet(scalar)


@pytest.mark.parametrize("command", ["up", "serve", "envoy-config", "check"])
def test_every_command_refuses_an_invalid_file(tmp_path: Path, command: str) -> None:
    data = local_data()
    data["hosts"][0]["http_port"] = "eighty"
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [sys.executable, "-m", "extproc", command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{path}: key hosts[0].http_port:" in result.stderr
    assert "valid integer" in result.stderr

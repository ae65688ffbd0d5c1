"""The fleet file: valid files load; invalid ones are refused with the file, key and problem named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import ConfigError, Tier, load_fleet, parse_fleet
from extproc.config.picker import PollSpec

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
        (lambda d: d.update(hosts=[]), "(top level)", "neither hosts nor pools"),
        (lambda d: d["envoy"].update(fallback_tier="cpu", foo=1), "envoy.foo", "Extra inputs"),
        (lambda d: d["picker"].update(nvml_host="nope"), "(top level)", "not a host of this fleet"),
    ],
)
def test_invalid_fleet_names_file_key_and_problem(mutate: Any, key: str, problem: str) -> None:
    data = local_data()
    mutate(data)
    assert_refused(data, key, problem)


def assert_refused(data: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_fleet(data, "fleet.yaml")
    message = str(info.value)
    assert f"fleet.yaml: key {key}:" in message
    assert problem in message


def pool_fleet(**pool: Any) -> dict[str, Any]:
    """A fleet whose GPU tier is one DNS pool (no static GPU hosts)."""
    return {
        "hosts": [{"name": "cpu-a", "address": "10.0.0.1", "tier": "cpu"}],
        "pools": [{"name": "gpu", "dns": "triton-gpu.inference.svc.cluster.local", "tier": "gpu", **pool}],
    }


def test_a_tier_may_be_a_pool_alone() -> None:
    fleet = parse_fleet({**pool_fleet(refresh_s=2, labels={"speed": "fast"}), "dns_resolvers": ["10.96.0.10"]})
    assert fleet.tiers == (Tier.CPU, Tier.GPU) and fleet.envoy.fallback_tier is Tier.GPU
    (pool,) = fleet.pools
    assert (pool.http_port, pool.grpc_port, pool.metrics_port, pool.refresh_s) == (8000, 8001, 8002, 2)
    host = pool.host("10.0.0.7")
    assert (host.name, host.address, host.tier, host.labels) == (
        "gpu-10-0-0-7",
        "10.0.0.7",
        Tier.GPU,
        {"speed": "fast"},
    )
    assert pool.named("gpu-10-0-0-7") and not pool.named("gpu-a") and not pool.named("gpus-10-0-0-7")
    assert fleet.dns_resolvers == ("10.96.0.10:53",)
    only_pools = parse_fleet({"pools": pool_fleet()["pools"]})
    assert only_pools.hosts == () and only_pools.tiers == (Tier.GPU,)
    resolvers = ["127.0.0.1:5353", "[::1]:53", "::1", "[fd00::1]"]
    assert parse_fleet({**pool_fleet(), "dns_resolvers": resolvers}).dns_resolvers == (
        "127.0.0.1:5353",
        "[::1]:53",
        "[::1]:53",
        "[fd00::1]:53",
    )


def second_pool(data: dict[str, Any], **pool: Any) -> None:
    data["pools"].append({**data["pools"][0], "name": "gpu-b", **pool})


@pytest.mark.parametrize(
    ("mutate", "key", "problem"),
    [
        (lambda d: d["pools"][0].update(dns="10.0.0.9"), "pools[0].dns", "is an IP address: list it under hosts"),
        (lambda d: d["pools"][0].update(dns="triton gpu"), "pools[0].dns", "not a DNS name"),
        (lambda d: d["pools"][0].update(dns="a..b"), "pools[0].dns", "not a DNS name"),
        (lambda d: d["pools"][0].update(dns="x" * 64 + ".svc"), "pools[0].dns", "not a DNS name"),
        (lambda d: d["pools"][0].update(name="GPU"), "pools[0].name", "should match pattern"),
        (lambda d: d["pools"][0].update(name="p" * 48), "pools[0].name", "should match pattern"),
        (lambda d: d["pools"][0].update(refresh_s=0), "pools[0].refresh_s", "greater than or equal to 0.1"),
        (lambda d: d["pools"][0].update(tier="tpu"), "pools[0].tier", "'cpu' or 'gpu'"),
        (lambda d: d["pools"][0].update(grpc_port=8000), "pools[0]", "must differ"),
        (lambda d: d["pools"][0].update(address="10.0.0.1"), "pools[0].address", "Extra inputs are not permitted"),
        (lambda d: d["pools"][0].pop("dns"), "pools[0].dns", "Field required"),
        (lambda d: second_pool(d, name="gpu"), "(top level)", "pools: names must be unique"),
        (lambda d: second_pool(d, dns="triton-gpu.inference.svc.cluster.local."), "(top level)", "both use"),
        (
            lambda d: d["hosts"].append({"name": "gpu-10-0-0-9", "address": "10.0.0.9", "tier": "gpu"}),
            "(top level)",
            "named like the hosts of pool 'gpu'",
        ),
        (lambda d: d.update(dns_resolvers=["resolver.local"]), "dns_resolvers", "not IP[:PORT]"),
        (lambda d: d.update(dns_resolvers=["10.0.0.1:99999"]), "dns_resolvers", "not IP[:PORT]"),
        (lambda d: d.update(dns_resolvers=[]), "dns_resolvers", "at least 1 item"),
        (lambda d: d.update(pools=[]), "(top level)", "'gpu' has no hosts and no pools"),
    ],
)
def test_invalid_pools_name_file_key_and_problem(mutate: Any, key: str, problem: str) -> None:
    data = pool_fleet()
    mutate(data)
    assert_refused(data, key, problem)


def test_pools_of_one_name_on_other_ports_are_fine() -> None:
    data = pool_fleet()
    second_pool(data, http_port=9000, grpc_port=9001, metrics_port=9002)
    assert [p.name for p in parse_fleet(data).pools] == ["gpu", "gpu-b"]


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


@pytest.mark.parametrize(
    ("poll", "hosts", "seconds"),
    [
        ({}, 3, 0.020),  # a small fleet's counts stay fresh
        ({}, 40, 0.020),
        ({}, 100, 0.050),  # 0.5 ms a host
        ({}, 400, 0.200),
        ({}, 1000, 0.200),  # never slower than 200 ms under traffic
        ({"idle_envoy_admin_ms": 150, "stale_after_ms": 3000}, 1000, 0.150),  # nor than the idle interval
        ({"envoy_admin_ms": 50}, 1000, 0.050),  # a set interval is kept
    ],
)
def test_envoys_read_interval_follows_the_fleets_size(poll: dict[str, int], hosts: int, seconds: float) -> None:
    assert PollSpec(**poll).envoy_admin_s(hosts) == pytest.approx(seconds)

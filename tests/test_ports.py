"""``benchmarks.ports``: free ports below the ephemeral range, never twice, one slice per xdist worker."""

from __future__ import annotations

import socket

import pytest

from benchmarks import ports
from benchmarks.ports import free_ports


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    low, high = ports._range()
    first, second = free_ports(20), free_ports(20)
    assert len(set(first + second)) == 40
    assert all(low <= p < high for p in first + second)
    for port in first:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


@pytest.fixture
def whole_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside pytest-xdist, with nothing handed out yet."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    monkeypatch.setattr(ports, "_handed_out", set())


@pytest.mark.usefixtures("whole_range")
def test_a_port_in_use_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        monkeypatch.setattr(ports, "_range", lambda: (taken, taken + 1))
        with pytest.raises(RuntimeError, match=f"no 1 free loopback ports in {taken}-{taken}"):
            free_ports(1)


@pytest.mark.usefixtures("whole_range")
def test_a_port_is_handed_out_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_range", lambda: (30000, 30003))
    monkeypatch.setattr(ports, "_bindable", lambda port: True)
    assert sorted(free_ports(3)) == [30000, 30001, 30002]
    with pytest.raises(RuntimeError):
        free_ports(1)


@pytest.mark.parametrize(
    ("worker", "count", "expected"),
    [
        ("gw0", "3", (20000, 24000)),
        ("gw2", "3", (28000, 32000)),
        ("", "", (20000, 32000)),  # outside pytest-xdist: the whole range
        ("master", "3", (20000, 32000)),
    ],
)
def test_each_xdist_worker_has_its_own_slice(
    monkeypatch: pytest.MonkeyPatch, worker: str, count: str, expected: tuple[int, int]
) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", count)
    assert ports._slice(20000, 32000) == expected


def test_envoy_base_ids_never_repeat_nor_meet_a_port() -> None:
    base_ids = [ports.envoy_base_id() for _ in range(20)]
    assert len(set(base_ids)) == 20
    assert set(base_ids).isdisjoint(free_ports(20))

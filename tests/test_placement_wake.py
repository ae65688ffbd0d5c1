"""Scale from zero in the picker (extproc.placement.wake) over a hand-built datastore; the loader stands in
for Triton's repository API (the end-to-end test, tests/test_scale_from_zero.py, loads on real Triton)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from extproc.config import ConfigError, Fleet, HostSpec, parse_fleet
from extproc.datapath.datastore import Datastore
from extproc.datapath.metrics import PickerMetrics
from extproc.placement.wake import Waker

MODELS = ("resnet", "bert")


def fleet(mode: str = "refuse", **placement: Any) -> Fleet:
    return parse_fleet(
        {
            "hosts": [
                {"name": "g1", "address": "10.0.0.1", "tier": "gpu"},
                {"name": "g2", "address": "10.0.0.2", "tier": "gpu"},
                {"name": "c1", "address": "10.0.1.1", "tier": "cpu"},
            ],
            "models": [{"name": "resnet", "tiers": ["gpu"]}],
            "placement": {
                "scale_from_zero": {"mode": mode, "retry_after_failure_s": 30},
                "models": {"resnet": {"min_copies": 0}},
                "tier_memory_bytes": {"gpu": "10GiB"},
                "default_footprint_bytes": "4GiB",
            }
            | placement,
        }
    )


def live(store: Datastore, ready: dict[str, list[str]]) -> None:
    """Every host fresh, routable, with every model of MODELS in its repository and ``ready`` READY."""
    now = store.now()
    for name, host in store.hosts.items():
        store.update_index(host, {m: frozenset({"1"}) for m in ready.get(name, [])}, frozenset(MODELS), now)
        host.metrics_at = host.envoy_at = now


def started(settings: Fleet, ready: dict[str, list[str]], loads: Loads) -> tuple[Datastore, Waker]:
    """A datastore of ``settings``'s hosts, live with ``ready`` READY, and a waker that loads with ``loads``."""
    store = Datastore(settings)
    live(store, ready)
    return store, Waker(settings, loader=loads)


class Loads:
    """What the waker asked to load; each load waits for :meth:`finish` (or fails with ``error``)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.asked: list[tuple[str, str]] = []
        self.error = error
        self.done = asyncio.Event()

    async def __call__(self, fleet: Fleet, host: HostSpec, model: str, timeout_s: float) -> None:
        self.asked.append((host.name, model))
        await self.done.wait()
        if self.error is not None:
            raise self.error


def test_one_load_per_model_on_the_host_the_controller_would_choose() -> None:
    async def scenario() -> None:
        store = Datastore(fleet())
        # g1 holds bert (4 GiB of its 10): g2 has the most headroom; c1 is not of the model's tiers.
        live(store, {"g1": ["bert"]})
        loads = Loads()
        metrics = PickerMetrics(store)
        waker = Waker(fleet(), metrics, loads)
        first = waker.wake("resnet", store)
        second = waker.wake("resnet", store)
        assert first is not None and first.host == "g2"
        assert second == first
        await asyncio.sleep(0)
        assert loads.asked == [("g2", "resnet")]
        loads.done.set()
        await asyncio.sleep(0)
        # Loaded, not yet in the picker's view: still that load, not a second one.
        again = waker.wake("resnet", store)
        assert again is not None and again.host == "g2" and again.done_at is not None
        counts = {
            outcome: metrics.registry.get_sample_value(
                "extproc_scale_from_zero_loads_total", {"model": "resnet", "outcome": outcome}
            )
            for outcome in ("started", "done", "failed")
        }
        assert counts == {"started": 1.0, "done": 1.0, "failed": None}
        await asyncio.sleep(0)
        assert loads.asked == [("g2", "resnet")]
        await waker.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("mode", "model", "ready"),
    [
        ("off", "resnet", {}),  # the setting is off
        ("refuse", "bert", {}),  # not a model placement manages
        ("refuse", "resnet", {"g1": ["resnet"]}),  # a host has it READY: nothing to wake
    ],
)
def test_nothing_is_loaded(mode: str, model: str, ready: dict[str, list[str]]) -> None:
    async def scenario() -> None:
        loads = Loads()
        store, waker = started(fleet(mode), ready, loads)
        assert waker.wake(model, store) is None
        await asyncio.sleep(0)
        assert loads.asked == []

    asyncio.run(scenario())


def test_no_host_within_the_memory_budget_loads_nothing() -> None:
    async def scenario() -> None:
        settings = fleet(tier_memory_bytes={"gpu": "6GiB"})
        loads = Loads()
        # 4 of 6 GiB used on each: no room for 4 more
        store, waker = started(settings, {"g1": ["bert"], "g2": ["bert"]}, loads)
        assert waker.wake("resnet", store) is None
        await asyncio.sleep(0)
        assert loads.asked == []

    asyncio.run(scenario())


def test_a_full_default_tier_loads_on_the_models_next_tier() -> None:
    async def scenario() -> None:
        # resnet may run on gpu, then cpu; both gpu hosts are full (4 of 6 GiB used), c1 has room.
        settings = parse_fleet(
            {
                **fleet().model_dump(mode="json", exclude_defaults=True),
                "models": [{"name": "resnet", "tiers": ["gpu", "cpu"]}],
            }
        )
        settings = settings.model_copy(
            update={"placement": settings.placement.model_copy(update={"tier_memory_bytes": {"gpu": 6 * 2**30}})}
        )
        loads = Loads()
        store, waker = started(settings, {"g1": ["bert"], "g2": ["bert"]}, loads)
        waking = waker.wake("resnet", store)
        assert waking is not None and waking.host == "c1"

    asyncio.run(scenario())


def test_a_failed_load_is_not_retried_until_the_delay_passes() -> None:
    async def scenario() -> None:
        loads = Loads(error=RuntimeError("failed to load 'resnet'"))
        loads.done.set()
        store, waker = started(fleet(), {}, loads)
        assert waker.wake("resnet", store) is not None
        await asyncio.sleep(0.01)
        assert waker.wake("resnet", store) is None
        assert not await waker.ready("resnet", lambda: store, 1.0)
        waker.configure(fleet(scale_from_zero={"mode": "refuse", "retry_after_failure_s": 0}))
        assert waker.wake("resnet", store) is not None
        await asyncio.sleep(0.01)
        assert len(loads.asked) == 2

    asyncio.run(scenario())


def test_ready_waits_for_the_copy_and_gives_up_at_the_deadline() -> None:
    async def scenario() -> None:
        loads = Loads()
        store, waker = started(fleet("hold"), {}, loads)
        assert waker.wake("resnet", store) is not None
        assert not await waker.ready("resnet", lambda: store, 0.1)

        async def appear() -> None:
            await asyncio.sleep(0.1)
            loads.done.set()
            live(store, {"g2": ["resnet"]})

        task = asyncio.create_task(appear())
        assert await waker.ready("resnet", lambda: store, 2.0)
        await task
        await waker.aclose()

    asyncio.run(scenario())


def test_held_requests_share_one_watcher() -> None:
    async def scenario() -> None:
        loads = Loads()
        store, waker = started(fleet("hold"), {}, loads)
        assert waker.wake("resnet", store) is not None
        waits = [asyncio.create_task(waker.ready("resnet", lambda: store, 2.0)) for _ in range(20)]
        await asyncio.sleep(0.01)
        watchers = [t for t in asyncio.all_tasks() if t.get_name() == "scale-from-zero-watch-resnet"]
        assert len(watchers) == 1
        loads.done.set()
        live(store, {"g1": ["resnet"]})
        assert await asyncio.gather(*waits) == [True] * 20
        await waker.aclose()

    asyncio.run(scenario())


def test_hold_is_bounded_by_envoys_wait() -> None:
    with pytest.raises(ConfigError, match="hold_ms"):
        parse_fleet(
            {
                "hosts": [{"name": "g1", "address": "10.0.0.1", "tier": "gpu"}],
                "picker": {"body_timeout_ms": 5000},
                "placement": {"scale_from_zero": {"mode": "hold", "hold_ms": 8000}},
            }
        )

"""The routing policies the simulator compares.

- ``round_robin`` / ``least_request``: Envoy alone (each gateway its own rotation / its own active counts).
- ``expected_completion_baseline``: the simple picker of issue 18, per gateway: Envoy's ``rq_active`` polled
  every 20 ms plus its own picks since, each host's mean batch time from Triton's counters (scraped like the
  picker's), and the host minimising ``(in_flight / max_batch + 1) x mean_batch_time``.
- ``picker``: the real :class:`extproc.datapath.scheduling.scheduler.Scheduler` (the scenario's fleet file, so the
  default profile unless the scenario sets one), one per gateway, each over its own real
  :class:`extproc.datapath.datastore.Datastore` fed through the real telemetry code: every scrape renders the host's
  counters as Triton's ``/metrics`` text and runs :func:`~extproc.telemetry.triton_metrics.parse_metrics` and
  :func:`~extproc.telemetry.triton_metrics.derive_load`; the repository index goes through
  :func:`~extproc.telemetry.repository.apply_index` and Envoy's view through
  :func:`~extproc.telemetry.envoy_admin.apply_envoy_view`, at the fleet file's poll intervals.
- ``oracle``: full, instant knowledge of every queue, instance and request size: each request goes where it
  would finish first given everything queued now (a bound to aim at, not a schedule: later arrivals can
  still join its batch).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from functools import partial

from benchmarks.sim.engine import Batcher, Gateway, Policy, Sim
from extproc.config import Fleet
from extproc.datapath.batch_cost import Batching
from extproc.datapath.datastore import Datastore, HostState
from extproc.datapath.peer_load import PeerLoad, silent_after_s
from extproc.datapath.scheduling.scheduler import Scheduler
from extproc.datapath.scheduling.types import InferenceRequest, Protocol, Reject
from extproc.datapath.shared_picks import LEADER_READ_S, RelayReads, SharedPicks, rows
from extproc.telemetry.envoy_admin import EndpointStatus, apply_envoy_view
from extproc.telemetry.repository import RepositoryIndex, apply_index
from extproc.telemetry.triton_metrics import TritonSnapshot, derive_load, parse_metrics

_REJECT_STATUS = {429: 5, 503: 6, 404: 7}


def buckets(n_hosts: int, period_s: float, tick_s: float, phase: float) -> list[list[int]]:
    """Hosts spread evenly over a poll period (as the collector's loops are), shifted by ``phase`` (a
    fraction of the period), in slots of one tick each."""
    slots = max(1, round(period_s / tick_s))
    out: list[list[int]] = [[] for _ in range(slots)]
    for i in range(n_hosts):
        out[int(((i / n_hosts + phase) % 1.0) * slots) % slots].append(i)
    return out


class RoundRobin(Policy):
    name = "round_robin"

    def route(self, r: int, gateway: Gateway, now: float) -> Sequence[int] | int:
        h = gateway.round_robin(self.sim.cluster_pool(r, gateway, now))
        return (h,) if h >= 0 else ()

    def fallback(self, r: int, gateway: Gateway, now: float, tried: Sequence[int]) -> int:
        return gateway.round_robin(self.sim.cluster_pool(r, gateway, now), tried)


class LeastRequest(Policy):
    name = "least_request"

    def route(self, r: int, gateway: Gateway, now: float) -> Sequence[int] | int:
        h = gateway.least_request(self.sim.cluster_pool(r, gateway, now))
        return (h,) if h >= 0 else ()


class _Ticker:
    """Runs one gateway's telemetry on the scenario's tick grid: Triton scrapes, repository polls and
    Envoy admin polls, each host at its own phase of the period."""

    def __init__(self, sim: Sim, fleet: Fleet, rng: random.Random) -> None:
        poll = fleet.picker.poll
        tick = sim.scenario.telemetry.tick_ms / 1000.0
        n = len(sim.hosts)
        self.tick = tick
        self.metrics = buckets(n, poll.triton_metrics_ms / 1000.0, tick, rng.random())
        self.repository = buckets(n, poll.repository_ms / 1000.0, tick, rng.random())
        self.envoy_every = max(1, round(poll.envoy_admin_s(n) / tick))
        self.envoy_phase = rng.randrange(self.envoy_every)
        self.count = 0

    def start(
        self,
        sim: Sim,
        scrape: Callable[[int, float], None],
        index: Callable[[int, float], None],
        envoy: Callable[[float], None],
    ) -> None:
        def step(now: float) -> None:
            k = self.count
            self.count += 1
            for i in self.metrics[k % len(self.metrics)]:
                scrape(i, now)
            for i in self.repository[k % len(self.repository)]:
                index(i, now)
            if k % self.envoy_every == self.envoy_phase:
                envoy(now)

        sim.every(self.tick, self.tick, step)


# ------------------------------------------------------------------------------------------- the picker


class _PickerGateway:
    """One picker replica (or one worker of it: ``picker.workers``): its own datastore, telemetry and
    scheduler, beside its own Envoy (its workers' Envoy)."""

    def __init__(
        self,
        sim: Sim,
        fleet: Fleet,
        gateway: Gateway,
        worker: int = 0,
        shared_picks: SharedPicks | None = None,
        share_load: bool = False,
        leader: _Leader | None = None,
    ) -> None:
        self.sim = sim
        self.gateway = gateway
        seed = sim.scenario.seed
        label = f"{gateway.index}/{worker}" if worker else f"{gateway.index}"
        self.store = Datastore(fleet, clock=lambda: sim.now)
        # With workers, their leader holds the replicas' channel.
        self.peer_load = PeerLoad(self.store, silent_after_s(fleet)) if share_load and leader is None else None
        self.leader = leader
        self.shared_picks = shared_picks
        self.scheduler = Scheduler(
            fleet,
            self.store,
            rng=random.Random(f"{seed}/picker/{label}"),
            pick_weight=fleet.picker.workers,
            shared_picks=shared_picks,
            peer_load=self.peer_load,
        )
        self.states: list[HostState] = [self.store.hosts[h.name] for h in sim.hosts]
        self.index_of = {id(s): i for i, s in enumerate(self.states)}
        self.snapshots: list[TritonSnapshot | None] = [None] * len(sim.hosts)
        timings = sim.scenario.models
        self.repo: list[RepositoryIndex] = []
        self.batching: list[dict[str, Batching]] = []
        for h in sim.hosts:
            names = [sim.model_names[m] for m in h.batchers]
            self.repo.append(RepositoryIndex({m: frozenset({"1"}) for m in names}, frozenset(names)))
            self.batching.append(
                {m: Batching(max_batch=timings[m].max_batch, instances=timings[m].instances) for m in names}
            )
        self.requests = [
            InferenceRequest(Protocol(e.protocol), e.model, size_bytes=e.base_bytes) for e in sim.scenario.load.mix
        ]
        # A gateway's workers read the same telemetry at the same moments, as from their leader's scrapes.
        self.ticker = _Ticker(sim, fleet, random.Random(f"{seed}/picker-telemetry/{gateway.index}"))
        self.check_rest_bodies = fleet.picker.check_rest_bodies

    def start(self) -> None:
        # As after `extproc up`'s wait: every host indexed, scraped once and seen by Envoy.
        for i in range(len(self.states)):
            self.poll_index(i, 0.0)
            self.scrape(i, 0.0)
        self.poll_envoy(0.0)
        self.ticker.start(self.sim, self.scrape, self.poll_index, self.poll_envoy)

    def scrape(self, i: int, now: float) -> None:
        """What TelemetryCollector._poll_metrics does with a page (a dead host's poll fails: nothing)."""
        host = self.sim.hosts[i]
        if not host.alive:
            return
        snapshot = parse_metrics(host.metrics_text())
        state = self.states[i]
        envoy_at = state.envoy_at
        envoy_fresh = envoy_at is not None and now - envoy_at <= self.store.stale_after_s
        load = derive_load(self.snapshots[i], snapshot, state.load, state.envoy.answered() if envoy_fresh else None)
        state.load = load
        self.snapshots[i] = snapshot
        state.metrics_at = now
        if not envoy_fresh:
            state.reset_estimate(load.pending, now)
        self.store.changed()

    def poll_index(self, i: int, now: float) -> None:
        """TelemetryCollector._poll_repository: the index, then the READY models' batching."""
        if not self.sim.hosts[i].alive:
            return
        state = self.states[i]
        apply_index(self.store, state, self.repo[i], now)
        state.batching = self.batching[i]
        self.store.changed()

    def poll_envoy(self, now: float) -> None:
        """TelemetryCollector._poll_envoy: this gateway's /clusters, per host (a worker: its leader's poll, with
        the other replicas' counts at that poll)."""
        endpoints = _endpoints(self.gateway, self.states, now)
        if self.shared_picks is not None:
            self.shared_picks.catch_up(self.store, now)
        if self.leader is not None:
            self.store.set_peer_counts(self.leader.poll_envoy(now))
        if self.peer_load is not None:
            self.peer_load.expire(now)
        apply_envoy_view(self.store, endpoints, now)
        if self.peer_load is not None:
            self.peer_load.polled()

    def route(self, r: int) -> Sequence[int] | int:
        sim = self.sim
        template = self.requests[sim.trace.entry[r]]
        # As the handlers build it: a gRPC request's rows are in its first message (the inputs' shapes), a
        # REST request has only its content-length before routing.
        grpc = template.protocol is Protocol.GRPC
        request = InferenceRequest(
            template.protocol, template.model, size_bytes=sim.size_bytes[r], rows=sim.rows[r] if grpc else None
        )
        decision = self.scheduler.decide(request)
        self.scheduler.refresh()  # as the edge does once it has answered
        if not grpc and self.check_rest_bodies:
            # As the edge's body check reads the tensor headers after routing: elements grow with the rows.
            self.scheduler.learn_size(request, sim.rows[r])
        if isinstance(decision, Reject):
            return _REJECT_STATUS.get(decision.status, 6)
        index_of = self.index_of
        return tuple([index_of[id(h)] for h in decision.hosts])


def _endpoints(g: Gateway, states: Sequence[HostState], now: float) -> dict[str, EndpointStatus]:
    """A gateway's Envoy as its /clusters shows it."""
    return {
        s.http_endpoint: EndpointStatus(
            rq_active=g.inflight[i],
            rq_total=g.sent[i],
            failed_outlier_check=now < g.ejected_until[i],
            failed_active_health_check=g.unhealthy[i],
        )
        for i, s in enumerate(states)
    }


class _Leader:
    """A gateway's leader where its workers share loads with the other gateways' (``picker.workers`` over 1
    with ``picker.replicas.share_load``), as :mod:`extproc.roles`'s: the replicas' channel on a datastore of
    its Envoy's counts, the other replicas' picks written to the workers' buffer as they arrive, the workers'
    read and told to the other replicas as :class:`~extproc.datapath.shared_picks.RelayReads` does."""

    def __init__(self, sim: Sim, fleet: Fleet, gateway: Gateway, picks: SharedPicks) -> None:
        self.sim = sim
        self.gateway = gateway
        self.store = Datastore(fleet, clock=lambda: sim.now)
        self.states = [self.store.hosts[h.name] for h in sim.hosts]
        self.peer_load = PeerLoad(self.store, silent_after_s(fleet))
        self.peer_load.on_pick = picks.append
        self._reads = RelayReads(picks, self.peer_load.picked_keys, 0.0)
        self._polled_at: float | None = None

    def start(self) -> None:
        self.sim.at(LEADER_READ_S, self._tell)

    def _tell(self, now: float) -> None:
        self.sim.at(now + self._reads.read(now), self._tell)

    def poll_envoy(self, now: float) -> dict[str, float | None]:
        """The Envoy poll its workers share (the first worker's call at ``now`` makes it), and the other
        replicas' counts at it."""
        if self._polled_at != now:
            self._polled_at = now
            self.peer_load.expire(now)
            apply_envoy_view(self.store, _endpoints(self.gateway, self.states, now), now)
            self.peer_load.polled()
        return self.peer_load.at_poll or {}


class Picker(Policy):
    """The picker beside each gateway; with ``picker.workers`` (the scenario's fleet), that many workers
    behind each gateway's Envoy, which takes turns among them, sharing their picks as
    ``picker.share_worker_picks`` says. The workers read the hosts' telemetry and Envoy's counts at the same
    moments, when their leader would (it pushes each Envoy poll as it lands; the push's own time, and the
    up to ``PUSH_INTERVAL_S`` its other telemetry waits, are not modelled). With
    ``picker.replicas.share_load``, the gateways' pickers tell each other their picks and counts, each batch
    (the events of one moment) reaching the others ``telemetry.replica_lag_ms`` later; each still scrapes the
    hosts itself (a follower's telemetry from the publisher is not modelled). With workers too, each
    gateway's leader holds its end of the channel (:class:`_Leader`)."""

    name = "picker"
    ext_proc = True

    def __init__(self, sim: Sim) -> None:
        super().__init__(sim)
        fleet = sim.scenario.real_fleet()
        n = fleet.picker.workers
        self.workers: list[list[_PickerGateway]] = []
        shared = n > 1 and fleet.picker.share_worker_picks
        share_load = fleet.picker.replicas.share_load
        self.leaders: list[_Leader] = []
        for g in sim.gateways:
            n_rows = rows(n, share_load)
            buffer = memoryview(bytearray(SharedPicks.size(n_rows))) if shared else None
            picks = [None if buffer is None else SharedPicks(buffer, n_rows, k) for k in range(n)]
            leader = None
            if buffer is not None and share_load:
                leader = _Leader(sim, fleet, g, SharedPicks(buffer, n_rows, n))
                self.leaders.append(leader)
            self.workers.append([_PickerGateway(sim, fleet, g, k, picks[k], share_load, leader) for k in range(n)])
        self.views = [workers[0] for workers in self.workers]  # each gateway's first worker
        self._turns = [0] * len(sim.gateways)
        self._lag_s = sim.scenario.telemetry.replica_lag_ms / 1000
        # Each gateway's end of the replicas' channel: its leader's, or its only picker's.
        ends = [(leader.gateway, leader.peer_load) for leader in self.leaders] or [
            (v.gateway, v.peer_load) for v in self.views if v.peer_load is not None
        ]
        self._replicas = [peer_load for _, peer_load in ends]
        for g, peer_load in ends:
            peer_load.on_ready = self._sender(peer_load, str(g.index).encode())

    def _sender(self, peer_load: PeerLoad, peer: bytes) -> Callable[[], None]:
        """A replica's channel: what it told during one moment reaches the others ``replica_lag_ms`` later."""
        sim = self.sim

        def send(now: float) -> None:
            events = peer_load.take()
            for other in self._replicas:
                if other is not peer_load:
                    sim.at(now + self._lag_s, partial(other.receive, peer, events))

        return lambda: sim.at(sim.now, send)

    @property
    def schedulers(self) -> list[Scheduler]:
        return [v.scheduler for workers in self.workers for v in workers]

    def start(self) -> None:
        for workers in self.workers:
            for v in workers:
                v.start()
        for leader in self.leaders:
            leader.start()

    def route(self, r: int, gateway: Gateway, now: float) -> Sequence[int] | int:
        workers = self.workers[gateway.index]
        turn = self._turns[gateway.index]
        self._turns[gateway.index] = turn + 1
        return workers[turn % len(workers)].route(r)


# ------------------------------------------------------------------------------------ the simple picker


class _BaselineGateway:
    def __init__(self, sim: Sim, fleet: Fleet, gateway: Gateway, smoothing: float) -> None:
        self.sim = sim
        self.gateway = gateway
        n = len(sim.hosts)
        self.polled = [0] * n  # Envoy's rq_active at the last poll
        self.picks = [0] * n  # own picks since
        self.usable = [True] * n  # neither unhealthy nor ejected at the last poll
        self.scraped_at = [0.0] * n
        self.smoothing = smoothing
        self.stale_s = fleet.picker.poll.stale_after_ms / 1000.0
        self.max_hosts = fleet.picker.max_hosts
        # Per model, per host: the counters at the last scrape (success, exec, compute_us), the mean batch time.
        n_models = len(sim.model_names)
        self.last: list[dict[int, tuple[int, int, float]]] = [{} for _ in range(n_models)]
        self.batch_ms: list[dict[int, float]] = [{} for _ in range(n_models)]
        self.max_batch = [float(sim.scenario.models[m].max_batch) for m in sim.model_names]
        self.turn = 0
        self.ticker = _Ticker(sim, fleet, random.Random(f"{sim.scenario.seed}/baseline/{gateway.index}"))
        self.poll_s = sim.scenario.telemetry.baseline_envoy_ms / 1000.0

    def start(self) -> None:
        for i in range(len(self.sim.hosts)):
            self.scrape(i, 0.0)
        self.poll(0.0)
        self.ticker.start(self.sim, self.scrape, lambda i, now: None, lambda now: None)
        self.sim.every(self.poll_s, self.gateway.rng.random() * self.poll_s, self.poll)

    def poll(self, now: float) -> None:
        g = self.gateway
        self.polled = list(g.inflight)
        self.picks = [0] * len(self.polled)
        self.usable = [g.usable(i, now) for i in range(len(self.polled))]

    def scrape(self, i: int, now: float) -> None:
        host = self.sim.hosts[i]
        if not host.alive:
            return
        self.scraped_at[i] = now
        k = self.smoothing
        for m, b in host.batchers.items():
            before = self.last[m].get(i)
            now_counts = (b.success, b.exec, b.compute_us)
            self.last[m][i] = now_counts
            if before is None or b.success < before[0]:
                continue
            done = b.success - before[0]
            if done <= 0:
                continue
            sample = (b.compute_us - before[2]) / done / 1000.0  # mean execution time a request took part in
            old = self.batch_ms[m].get(i)
            self.batch_ms[m][i] = sample if old is None else k * sample + (1 - k) * old

    def route(self, r: int, now: float) -> Sequence[int] | int:
        sim = self.sim
        m = sim.model[r]
        hosts = sim.serving[m]
        times = self.batch_ms[m]
        default = min(times.values()) if times else 1.0
        max_batch = self.max_batch[m]
        polled, picks, usable, scraped = self.polled, self.picks, self.usable, self.scraped_at
        oldest = now - self.stale_s
        n = len(hosts)
        self.turn += 1
        start = self.turn % n
        keep = self.max_hosts
        best: list[tuple[float, int]] = []
        for j in range(n):
            h = hosts[(start + j) % n]
            if not usable[h] or scraped[h] < oldest:
                continue
            c = ((polled[h] + picks[h]) / max_batch + 1.0) * times.get(h, default)
            if len(best) < keep or c < best[-1][0]:
                k = len(best)
                while k > 0 and best[k - 1][0] > c:
                    k -= 1
                best.insert(k, (c, h))
                if len(best) > keep:
                    best.pop()
        if not best:
            return 6
        picks[best[0][1]] += 1
        return tuple([h for _, h in best])


class ExpectedCompletionBaseline(Policy):
    name = "expected_completion_baseline"
    ext_proc = True

    def __init__(self, sim: Sim) -> None:
        super().__init__(sim)
        fleet = sim.scenario.real_fleet()
        smoothing = sim.scenario.telemetry.baseline_smoothing
        self.views = [_BaselineGateway(sim, fleet, g, smoothing) for g in sim.gateways]

    def start(self) -> None:
        for v in self.views:
            v.start()

    def route(self, r: int, gateway: Gateway, now: float) -> Sequence[int] | int:
        return self.views[gateway.index].route(r, now)


# ------------------------------------------------------------------------------------------- the oracle


class Oracle(Policy):
    name = "oracle"

    def __init__(self, sim: Sim) -> None:
        super().__init__(sim)
        self.batchers = [[sim.hosts[h].batchers[m] for h in hosts] for m, hosts in enumerate(sim.serving)]

    def route(self, r: int, gateway: Gateway, now: float) -> Sequence[int] | int:
        """Idle batchers are answered at once; a busy one only if it could beat the best so far (it cannot
        start before an instance frees), in the order of that bound."""
        sim = self.sim
        m = sim.model[r]
        rows = sim.rows[r]
        arrive = now + sim.to_host_s
        best_t = math.inf
        best: Batcher | None = None
        busy: list[tuple[float, int, Batcher]] = []
        enq = sim.enq_at
        for k, b in enumerate(self.batchers[m]):
            host = b.host
            if not host.alive:
                continue
            per_rows = host.factor if b.scaled else 1.0
            exec_s = (b.fixed + b.per_row * rows) * per_rows
            queued = b.queued_rows
            start = arrive if b.free else max(b.next_free, arrive)
            if b.instances == 1 and queued + rows <= b.max_batch:
                # Exact: it joins the next batch, which starts when the instance frees (not before the
                # oldest request's queue delay, unless the batch is full).
                total = queued + rows
                if total < b.max_batch:
                    head = enq[b.queue[0]] if b.queue else arrive
                    start = max(start, head + b.delay)
                t = start + (b.fixed + b.per_row * total) * per_rows
                if t < best_t:
                    best_t, best = t, b
                continue
            if b.instances == 1:
                # Not in the next batch: after it (the queue's head at least) and its own.
                bound = start + (b.fixed + b.per_row * sim.rows[b.queue[0]]) * per_rows + exec_s
            else:
                bound = start + exec_s
            if bound < best_t:
                busy.append((bound, k, b))
        busy.sort()
        completion = sim.completion_s
        for bound, _, b in busy:
            if bound >= best_t:
                break
            t = completion(b, rows, now)
            if t < best_t:
                best_t, best = t, b
        return (best.host.index,) if best is not None else ()


FACTORIES: dict[str, Callable[[Sim], Policy]] = {
    "round_robin": RoundRobin,
    "least_request": LeastRequest,
    "expected_completion_baseline": ExpectedCompletionBaseline,
    "picker": Picker,
    "oracle": Oracle,
}

"""The discrete-event core: Triton hosts with dynamic batchers, Envoy gateways with retries, and the clock.

One :class:`Sim` runs one policy over one trace. Events sit in a heap of ``(time, seq, code, a, b)``; the
trace's arrivals are merged in from a pointer rather than pushed. Everything random is drawn from
generators seeded from the scenario's seed, so a run repeats exactly.

Triton (per host, per model, :class:`Batcher`): requests queue in arrival order; when an instance is free the
batcher takes requests from the head while their rows fit ``max_batch``; a batch that is not full waits until
its oldest request has waited ``max_queue_delay`` (Triton's dynamic batcher without preferred sizes). One
execution of ``rows`` rows takes ``(fixed_ms + per_row_ms x rows) x factor``. The counters are Triton's, updated
as a batch completes: ``nv_inference_request_success`` +1 per request, ``nv_inference_count`` +rows,
``nv_inference_exec_count`` +1 per batch, ``nv_inference_queue_duration_us`` + each request's wait, and
``nv_inference_compute_infer_duration_us`` + the batch's whole duration *per request* (as Triton records it,
see :mod:`extproc.telemetry.triton_metrics`); ``nv_inference_pending_request_count`` is the queue now.

Envoy (per gateway, :class:`Gateway`): ``rq_active`` and ``rq_total`` per host (every attempt: from send to
answer, and ever sent), active
health checks (interval, unhealthy threshold), outlier detection (consecutive local-origin failures eject
for the ejection time, growing), and the route's retry policy: a try that cannot have reached its host
(connection refused by a dead host) is retried after Envoy's jittered back-off on the next host of the
picker's list (override_host), then by least request over the cluster, never on a host already tried; a
reset after the request was sent (the host died with it) is not retried.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

from benchmarks.sim.scenario import EnvoyModel, ModelTiming, SimScenario
from benchmarks.sim.trace import Trace

# Event codes.
_ENQUEUE: Final = 1  # a request reaches its host: (request, host)
_TIMER: Final = 2  # a batcher's queue delay ran out: (batcher, None)
_DONE: Final = 3  # a batch completed: (batcher, (epoch, start, end, batch))
_ANSWER: Final = 4  # an answer reaches the gateway: (request, (host, status))
_RETRY: Final = 5  # Envoy's back-off ended: (request, None)
_CALL: Final = 6  # a periodic callback: (callable, None)

# Request outcomes.
OK: Final = 0
STATUS_NAMES: Final = {
    OK: "ok",
    1: "timeout",
    2: "reset",  # the host died with the request on it
    3: "connect_failure",  # every try found its host dead
    4: "http 400",  # sent to a host without the model
    5: "picker 429",
    6: "picker 503",
    7: "picker 404",
    8: "no_healthy_upstream",
}
TIMEOUT: Final = 1
RESET: Final = 2
CONNECT_FAILURE: Final = 3
BAD_REQUEST: Final = 4
NO_HEALTHY: Final = 8
PENDING: Final = -1

Event = tuple[float, int, int, Any, Any]


class Batcher:
    """One model on one host: Triton's dynamic batcher and the model's counters."""

    __slots__ = (
        "compute_us",
        "count",
        "delay",
        "exec",
        "fixed",
        "free",
        "host",
        "instances",
        "jitter",
        "label",
        "max_batch",
        "model",
        "next_free",
        "per_row",
        "queue",
        "queue_us",
        "queued_rows",
        "running",
        "scaled",
        "success",
        "timer",
    )

    def __init__(self, host: SimHost, model: int, name: str, timing: ModelTiming) -> None:
        self.host = host
        self.model = model
        self.label = f'model="{name}",version="1"'
        self.max_batch = timing.max_batch
        self.delay = timing.queue_delay_us / 1e6
        self.instances = timing.instances
        self.fixed = timing.fixed_ms / 1000.0
        self.per_row = timing.per_row_ms / 1000.0
        self.scaled = timing.scaled
        self.jitter = timing.jitter_ms / 1000.0
        self.queue: deque[int] = deque()
        self.queued_rows = 0
        self.free = timing.instances
        self.running: list[tuple[float, list[int]]] = []  # (end, requests) of each executing batch
        self.next_free = 0.0  # with no instance free: when the first running batch ends
        self.timer = False
        self.reset_counters()

    def reset_counters(self) -> None:
        self.success = self.count = self.exec = 0
        self.queue_us = self.compute_us = 0.0

    def exec_s(self, rows: float) -> float:
        return (self.fixed + self.per_row * rows) * (self.host.factor if self.scaled else 1.0)


class SimHost:
    __slots__ = ("alive", "batchers", "epoch", "factor", "index", "name", "served")

    def __init__(self, index: int, name: str, factor: float) -> None:
        self.index = index
        self.name = name
        self.factor = factor
        self.alive = True
        self.epoch = 0  # bumped when the host dies: its running batches never complete
        self.batchers: dict[int, Batcher] = {}
        self.served = 0

    def metrics_text(self) -> str:
        """The host's ``/metrics`` page as Triton writes it: per family a HELP and a TYPE line, then one
        sample per model (the families the picker reads; values as integers)."""
        batchers = list(self.batchers.values())
        out = []
        for family, kind, value in _FAMILIES:
            out.append(f"# HELP {family} simulated\n# TYPE {family} {kind}\n")
            out.extend(f"{family}{{{b.label}}} {value(b)}\n" for b in batchers)
        return "".join(out)


_FAMILIES: Final[tuple[tuple[str, str, Callable[[Batcher], int]], ...]] = (
    ("nv_inference_request_success", "counter", lambda b: b.success),
    ("nv_inference_count", "counter", lambda b: b.count),
    ("nv_inference_exec_count", "counter", lambda b: b.exec),
    ("nv_inference_queue_duration_us", "counter", lambda b: round(b.queue_us)),
    ("nv_inference_compute_infer_duration_us", "counter", lambda b: round(b.compute_us)),
    ("nv_inference_pending_request_count", "gauge", lambda b: len(b.queue)),
)


class Gateway:
    """One Envoy: what it has in flight to each host, and its health checking and outlier detection."""

    def __init__(self, index: int, n_hosts: int, rng: random.Random) -> None:
        self.index = index
        self.rng = rng
        self.inflight = [0] * n_hosts
        self.sent = [0] * n_hosts  # rq_total: every attempt sent to the host
        self.unhealthy = [False] * n_hosts
        self.hc_failures = [0] * n_hosts
        self.consecutive = [0] * n_hosts  # local-origin failures in a row
        self.ejected_until = [-math.inf] * n_hosts
        self.ejections = [0] * n_hosts
        self.rr_turn = rng.randrange(1 << 30)
        # Bumped when a host's health or ejection changes: the pools below are rebuilt then.
        self.version = 0
        self._pools: dict[int, tuple[int, float, list[int]]] = {}

    def usable(self, host: int, now: float) -> bool:
        return not self.unhealthy[host] and now >= self.ejected_until[host]

    def pool(self, key: int, hosts: Sequence[int], now: float) -> list[int]:
        """The usable hosts among ``hosts`` (cached per key until health changes or an ejection ends)."""
        cached = self._pools.get(key)
        if cached is not None and cached[0] == self.version and now < cached[1]:
            return cached[2]
        usable = [h for h in hosts if self.usable(h, now)]
        until = min((self.ejected_until[h] for h in hosts if self.ejected_until[h] > now), default=math.inf)
        self._pools[key] = (self.version, until, usable)
        return usable

    def least_request(self, pool: Sequence[int], exclude: Sequence[int] = ()) -> int:
        """Envoy's LEAST_REQUEST with equal weights: the fewer active requests of two random draws (with
        replacement; a tie keeps the first); a draw of a host already tried is redrawn up to 5 times."""
        if not pool:
            return -1
        rng, inflight, n = self.rng, self.inflight, len(pool)
        best = -1
        for _ in range(2):
            h = pool[int(rng.random() * n)]
            for _ in range(5):
                if h not in exclude:
                    break
                h = pool[int(rng.random() * n)]
            if best < 0 or inflight[h] < inflight[best]:
                best = h
        return best

    def round_robin(self, pool: Sequence[int], exclude: Sequence[int] = ()) -> int:
        if not pool:
            return -1
        for _ in range(6):
            self.rr_turn += 1
            h = pool[self.rr_turn % len(pool)]
            if h not in exclude:
                return h
        return h

    def failure(self, host: int, now: float, n_hosts: int, spec: EnvoyModel) -> None:
        """A local-origin failure (connect failure, reset): outlier detection counts it."""
        self.consecutive[host] += 1
        if self.consecutive[host] >= spec.outlier_failures and now >= self.ejected_until[host]:
            ejected = sum(1 for u in self.ejected_until if u > now)
            if ejected == 0 or 100 * (ejected + 1) <= 50 * n_hosts:
                self.ejections[host] += 1
                self.ejected_until[host] = now + min(spec.max_ejection_s, spec.ejection_s * self.ejections[host])
                self.consecutive[host] = 0
                self.version += 1


class Policy:
    """How a request's hosts are chosen. ``route`` answers the hosts to try in order (the first is the
    pick), or a status code when the request is refused; retries past that list use ``fallback``."""

    name = "policy"
    ext_proc = False  # the decision is an ext_proc call (adds envoy.ext_proc_ms before the host)

    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    def start(self) -> None:
        """Schedule the policy's periodic work (telemetry); called once at time 0."""

    def route(self, r: int, gateway: Gateway, now: float) -> Sequence[int] | int:
        raise NotImplementedError

    def fallback(self, r: int, gateway: Gateway, now: float, tried: Sequence[int]) -> int:
        """The host of a retry past the routed list: least request over the cluster."""
        return gateway.least_request(self.sim.cluster_pool(r, gateway, now), tried)


class Sim:
    def __init__(
        self,
        scenario: SimScenario,
        trace: Trace,
        policy_factory: Callable[[Sim], Policy],
        n_gateways: int = 1,
        seed_label: str = "",
    ) -> None:
        self.scenario = scenario
        self.trace = trace
        self.now = 0.0
        self._heap: list[Event] = []
        self._seq = 0
        self.model_names = list(scenario.models)
        model_index = {m: i for i, m in enumerate(self.model_names)}
        self.hosts: list[SimHost] = []
        self.host_index: dict[str, int] = {}
        self.host_group: list[str] = []
        # Hosts that load each model (index = model index).
        self.serving: list[list[int]] = [[] for _ in self.model_names]
        for i, (name, group) in enumerate(scenario.host_specs()):
            host = SimHost(i, name, group.factor)
            for m in group.models:
                k = model_index[m]
                host.batchers[k] = Batcher(host, k, m, scenario.models[m])
                self.serving[k].append(i)
            self.hosts.append(host)
            self.host_index[name] = i
            self.host_group.append(group.name)
        self.all_hosts = list(range(len(self.hosts)))
        mix = scenario.load.mix
        self.entry_model = [model_index[e.model] for e in mix]
        n = len(trace)
        self.model = [self.entry_model[e] for e in trace.entry]
        self.rows = trace.rows
        self.size_bytes = [
            mix[e].base_bytes + mix[e].bytes_per_row * k for e, k in zip(trace.entry, trace.rows, strict=True)
        ]
        self.gw_of = [min(n_gateways - 1, int(g * n_gateways)) for g in trace.gate]
        self.enq_at = [0.0] * n
        self.done = [math.nan] * n
        self.status = [PENDING] * n
        self.host_of = [-1] * n  # the host the request is on (or was last sent to)
        self.routed: list[Sequence[int]] = [()] * n
        self.tried: list[list[int]] = [[] for _ in range(n)]
        self.outstanding = 0
        self.retries = 0
        self.decisions = 0
        spec = scenario.envoy
        self.envoy = spec
        self.to_host_s = spec.gateway_ms / 2000.0
        self.back_s = spec.gateway_ms / 2000.0
        self.rng = random.Random(f"{scenario.seed}/{seed_label}/envoy")
        # The same for every policy: the hosts' noise is not the policy's doing.
        self.jitter_rng = random.Random(f"{scenario.seed}/jitter")
        self.gateways = [
            Gateway(k, len(self.hosts), random.Random(f"{scenario.seed}/{seed_label}/gw{k}")) for k in range(n_gateways)
        ]
        self.policy = policy_factory(self)
        if self.policy.ext_proc:
            self.to_host_s += spec.ext_proc_ms / 1000.0
        self.end_s = (trace.arrival[-1] if n else 0.0) + scenario.load.timeout_s + 1.0

    # -------------------------------------------------------------------------------------- scheduling

    def push(self, t: float, code: int, a: Any, b: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, code, a, b))

    def every(self, period_s: float, first_s: float, fn: Callable[[float], None]) -> None:
        """Call ``fn(now)`` at ``first_s`` and every ``period_s`` after, for as long as the run lasts."""

        def tick(now: float) -> None:
            fn(now)
            self.push(now + period_s, _CALL, tick)

        self.push(first_s, _CALL, tick)

    def at(self, t: float, fn: Callable[[float], None]) -> None:
        self.push(t, _CALL, fn)

    def cluster_pool(self, r: int, gateway: Gateway, now: float) -> list[int]:
        """Envoy's own pool for a request: every host, or the model's hosts (``baseline_pool``)."""
        if self.scenario.baseline_pool == "model_hosts":
            m = self.model[r]
            return gateway.pool(m, self.serving[m], now)
        return gateway.pool(-1, self.all_hosts, now)

    # ------------------------------------------------------------------------------------------ the run

    def run(self) -> None:
        self.policy.start()
        spec = self.envoy
        for g in self.gateways:
            self.every(spec.health_interval_s, g.rng.random() * spec.health_interval_s, self._health_check(g))
        for event in self.scenario.events:
            for name in self.scenario.event_hosts(event):
                self.at(event.at_s, self._host_event(self.host_index[name], event.action, event.factor))
        arrivals = self.trace.arrival
        n = len(arrivals)
        heap = self._heap
        pop = heapq.heappop
        i = 0
        end = self.end_s
        while True:
            next_arrival = arrivals[i] if i < n else math.inf
            if heap and heap[0][0] <= next_arrival:
                t, _, code, a, b = pop(heap)
                if t > end:
                    break
                self.now = t
                if code == _DONE:
                    self._done(a, b, t)
                elif code == _ENQUEUE:
                    self._enqueue(a, b, t)
                elif code == _ANSWER:
                    self._answer(a, b[0], b[1], t)
                elif code == _TIMER:
                    a.timer = False
                    self._dispatch(a, t)
                elif code == _RETRY:
                    self._retry(a, t)
                else:
                    a(t)
            elif i < n:
                self.now = next_arrival
                self._arrive(i, next_arrival)
                i += 1
            else:
                break
            if i >= n and self.outstanding == 0:
                break
        for r in range(n):
            if self.status[r] == PENDING:
                self.status[r] = TIMEOUT

    # ---------------------------------------------------------------------------------------- requests

    def _arrive(self, r: int, now: float) -> None:
        self.outstanding += 1
        gateway = self.gateways[self.gw_of[r]]
        self.decisions += 1
        decision = self.policy.route(r, gateway, now)
        if isinstance(decision, int):
            self._finish(r, now + self.back_s, decision)
            return
        if not decision:
            self._finish(r, now + self.back_s, NO_HEALTHY)
            return
        self.routed[r] = decision
        self._send(r, decision[0], gateway, now)

    def _send(self, r: int, host: int, gateway: Gateway, now: float) -> None:
        self.tried[r].append(host)
        self.host_of[r] = host
        gateway.inflight[host] += 1
        gateway.sent[host] += 1
        h = self.hosts[host]
        if not h.alive:
            self.push(now + self.envoy.connect_fail_ms / 1000.0, _ANSWER, r, (host, CONNECT_FAILURE))
        elif self.model[r] not in h.batchers:
            self.push(
                now + self.to_host_s + self.envoy.reject_ms / 1000.0 + self.back_s, _ANSWER, r, (host, BAD_REQUEST)
            )
        elif self.to_host_s > 0:
            self.push(now + self.to_host_s, _ENQUEUE, r, host)
        else:
            self._enqueue(r, host, now)

    def _enqueue(self, r: int, host: int, now: float) -> None:
        h = self.hosts[host]
        if not h.alive:  # died while the request travelled: the connection is gone
            self._answer(r, host, RESET, now)
            return
        b = h.batchers[self.model[r]]
        self.enq_at[r] = now
        b.queue.append(r)
        b.queued_rows += self.rows[r]
        if b.free:
            self._dispatch(b, now)

    def _dispatch(self, b: Batcher, now: float) -> None:
        q = b.queue
        rows_of = self.rows
        while b.free and q:
            if b.queued_rows < b.max_batch and b.delay > 0:
                due = self.enq_at[q[0]] + b.delay
                if now < due - 1e-12:
                    if not b.timer:
                        b.timer = True
                        self.push(due, _TIMER, b)
                    return
            rows = 0
            batch = []
            limit = b.max_batch
            while q and rows + rows_of[q[0]] <= limit:
                r = q.popleft()
                rows += rows_of[r]
                batch.append(r)
            b.queued_rows -= rows
            b.free -= 1
            end = now + b.exec_s(rows)
            if b.jitter:
                end += self.jitter_rng.expovariate(1.0 / b.jitter)
            b.running.append((end, batch))
            if not b.free:
                b.next_free = min([e for e, _ in b.running])
            self.push(end, _DONE, b, (b.host.epoch, now, end, batch, rows))

    def _done(self, b: Batcher, info: tuple[int, float, float, list[int], int], now: float) -> None:
        epoch, start, end, batch, rows = info
        host = b.host
        if epoch != host.epoch:
            return  # the host died while this batch ran
        for k, run in enumerate(b.running):
            if run[1] is batch:
                del b.running[k]
                break
        b.free += 1
        if b.running:
            b.next_free = min([e for e, _ in b.running])
        duration_us = (end - start) * 1e6
        n = len(batch)
        b.success += n
        b.count += rows
        b.exec += 1
        b.compute_us += duration_us * n
        enq = self.enq_at
        b.queue_us += sum((start - enq[r]) * 1e6 for r in batch)
        host.served += n
        back = self.back_s
        for r in batch:
            if back > 0:
                self.push(now + back, _ANSWER, r, (host.index, OK))
            else:
                self._answer(r, host.index, OK, now)
        if b.queue:
            self._dispatch(b, now)

    def _answer(self, r: int, host: int, status: int, now: float) -> None:
        gateway = self.gateways[self.gw_of[r]]
        gateway.inflight[host] -= 1
        if status == OK:
            gateway.consecutive[host] = 0
            self._finish(r, now, OK)
            return
        if status in (CONNECT_FAILURE, RESET):
            gateway.failure(host, now, len(self.hosts), self.envoy)
        if status == CONNECT_FAILURE and len(self.tried[r]) <= self.envoy.num_retries:
            # Envoy's fully jittered back-off: the n-th retry waits up to (2^n - 1) x base.
            n = len(self.tried[r])
            wait = gateway.rng.random() * (2**n - 1) * self.envoy.retry_base_ms / 1000.0
            self.retries += 1
            self.push(now + wait, _RETRY, r)
            return
        self._finish(r, now, status)

    def _retry(self, r: int, now: float) -> None:
        gateway = self.gateways[self.gw_of[r]]
        tried = self.tried[r]
        routed = self.routed[r]
        host = -1
        for h in routed[len(tried) :]:
            if h not in tried:
                host = h
                break
        if host < 0:
            host = self.policy.fallback(r, gateway, now, tried)
        if host < 0:
            self._finish(r, now, NO_HEALTHY)
            return
        self._send(r, host, gateway, now)

    def _finish(self, r: int, now: float, status: int) -> None:
        if self.status[r] != PENDING:
            return
        if status == OK and now - self.trace.arrival[r] > self.scenario.load.timeout_s:
            status = TIMEOUT
        self.status[r] = status
        self.done[r] = now
        self.outstanding -= 1

    # ------------------------------------------------------------------------------ hosts and health

    def _host_event(self, host: int, action: str, factor: float | None) -> Callable[[float], None]:
        def apply(now: float) -> None:
            h = self.hosts[host]
            if action == "factor" and factor is not None:
                h.factor = factor
            elif action == "die" and h.alive:
                h.alive = False
                h.epoch += 1
                for b in h.batchers.values():
                    lost = list(b.queue) + [r for _, batch in b.running for r in batch]
                    b.queue.clear()
                    b.queued_rows = 0
                    b.running.clear()
                    b.free = b.instances
                    for r in lost:
                        self._answer(r, host, RESET, now)
            elif action == "revive" and not h.alive:
                h.alive = True
                for b in h.batchers.values():
                    b.reset_counters()  # a new Triton process

        return apply

    def _health_check(self, g: Gateway) -> Callable[[float], None]:
        threshold = self.envoy.unhealthy_threshold

        def check(now: float) -> None:
            for h in self.hosts:
                i = h.index
                if h.alive:
                    g.hc_failures[i] = 0
                    if g.unhealthy[i]:
                        g.unhealthy[i] = False
                        g.version += 1
                else:
                    g.hc_failures[i] += 1
                    if g.hc_failures[i] >= threshold and not g.unhealthy[i]:
                        g.unhealthy[i] = True
                        g.version += 1

        return check

    # ------------------------------------------------------------------------------- oracle's view

    def completion_s(self, b: Batcher, rows: int, now: float) -> float:
        """When a request of ``rows`` rows sent to ``b`` now would finish, from the exact state of its queue
        and instances (the requests that arrive after it unknown)."""
        h = b.host
        if not h.alive:
            return math.inf
        now += self.to_host_s
        limit = b.max_batch
        if not b.queue and b.free:
            wait = b.delay if rows < limit else 0.0
            return now + wait + b.exec_s(rows)
        free = [now] * b.free + [end for end, _ in b.running]
        heapq.heapify(free)
        queue = [self.rows[r] for r in b.queue]
        heads = [self.enq_at[r] for r in b.queue]
        queue.append(rows)
        heads.append(now)
        last = len(queue) - 1
        pos = 0
        while True:
            start = max(heapq.heappop(free), now)
            total = 0
            first = pos
            while pos <= last and total + queue[pos] <= limit:
                total += queue[pos]
                pos += 1
            if total < limit and pos > last:  # not full: waits for the oldest's queue delay
                start = max(start, heads[first] + b.delay)
            end = start + b.exec_s(total)
            if pos > last:
                return end
            heapq.heappush(free, end)

"""Triton's repository API (explicit model control) on every host of the fleet.

- :class:`TritonApi` is the small client interface the planners and executors act through;
  :class:`GrpcTriton` implements it over ``tritonclient.grpc``.
- :func:`read_index` asks every host for its repository index at once (a thread pool); a host that does
  not answer is reported in its :class:`HostIndex`, never raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Protocol

from extproc.admin_key import GRPC_HEADER
from extproc.config import HostSpec
from extproc.ops import OpsError

__all__ = [
    "ABSENT",
    "LOADING",
    "NOT_LOADED",
    "READY",
    "UNAVAILABLE",
    "UNKNOWN",
    "UNLOADING",
    "GrpcTriton",
    "HostIndex",
    "IndexEntry",
    "TritonApi",
    "TritonError",
    "read_index",
]

# Triton's model states (RepositoryIndex), and ours for the table.
READY: Final = "READY"
LOADING: Final = "LOADING"
UNLOADING: Final = "UNLOADING"
UNAVAILABLE: Final = "UNAVAILABLE"  # a load failed (the reason says why)
NOT_LOADED: Final = "-"  # in the host's repository, not loaded (never loaded, or unloaded)
ABSENT: Final = "n/a"  # not in the host's repository
UNKNOWN: Final = "?"  # the host did not answer

_STATE_ORDER: Final = (READY, LOADING, UNLOADING, UNAVAILABLE)

# Keep retrying a host that restarts; the sync client otherwise backs off for up to 2 minutes.
_CHANNEL_ARGS: Final[list[tuple[str, int]]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class TritonError(OpsError):
    """One Triton host refused or did not answer a repository call."""

    def __init__(self, host: str, message: str) -> None:
        super().__init__(f"{host}: {message}")
        self.host = host


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One row of Triton's repository index: a model version (or a never-loaded model: no version)."""

    name: str
    version: str = ""
    state: str = ""
    reason: str = ""


class TritonApi(Protocol):
    """Triton's repository API on any host of the fleet. Raises :class:`TritonError`."""

    def index(self, host: HostSpec, timeout_s: float) -> Sequence[IndexEntry]: ...

    def load(self, host: HostSpec, model: str, timeout_s: float) -> None:
        """Load (or reload) ``model``; returns once Triton has it READY, raises if it failed."""
        ...

    def unload(self, host: HostSpec, model: str, timeout_s: float) -> None:
        """Ask Triton to unload ``model``; Triton finishes the model's in-flight requests first and may
        return before the model has left UNLOADING."""
        ...


class GrpcTriton:
    """:class:`TritonApi` over ``tritonclient.grpc`` (sync), one client per host, safe across threads.
    ``admin_key``: the fleet's key, which every call here (model-repository APIs) needs on restricted hosts."""

    def __init__(self, admin_key: str | None = None) -> None:
        self._headers = {GRPC_HEADER: admin_key} if admin_key is not None else None
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _client(self, host: HostSpec) -> Any:
        import tritonclient.grpc as grpcclient

        with self._lock:
            client = self._clients.get(host.grpc_endpoint)
            if client is None:
                client = grpcclient.InferenceServerClient(url=host.grpc_endpoint, channel_args=_CHANNEL_ARGS)
                self._clients[host.grpc_endpoint] = client
            return client

    def _call(self, host: HostSpec, what: str, call: Callable[[Any], Any]) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return call(self._client(host))
        except InferenceServerException as exc:
            raise TritonError(host.name, f"{what} failed ({host.grpc_endpoint}): {_describe(exc)}") from None

    def index(self, host: HostSpec, timeout_s: float) -> Sequence[IndexEntry]:
        response = self._call(
            host,
            "repository index",
            lambda c: c.get_model_repository_index(headers=self._headers, client_timeout=timeout_s),
        )
        return [IndexEntry(m.name, m.version, m.state, m.reason) for m in response.models]

    def load(self, host: HostSpec, model: str, timeout_s: float) -> None:
        self._call(
            host, f"load {model}", lambda c: c.load_model(model, headers=self._headers, client_timeout=timeout_s)
        )

    def unload(self, host: HostSpec, model: str, timeout_s: float) -> None:
        self._call(
            host, f"unload {model}", lambda c: c.unload_model(model, headers=self._headers, client_timeout=timeout_s)
        )

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def _describe(exc: Any) -> str:
    status = str(exc.status() or "").removeprefix("StatusCode.")
    message = str(exc.message() or exc).strip().splitlines()
    text = message[0] if message else ""
    if status == "UNAVAILABLE":
        return f"unreachable ({text})"
    if status == "DEADLINE_EXCEEDED":
        return "timed out"
    return f"{status}: {text}" if status else text


# --- the fleet's repository indexes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostIndex:
    """One host's repository index, or why it could not be read."""

    host: HostSpec
    entries: tuple[IndexEntry, ...] = ()
    error: str | None = None

    @property
    def name(self) -> str:
        return self.host.name

    def state(self, model: str) -> str:
        """The model's state on this host: the most advanced of its versions' states."""
        if self.error is not None:
            return UNKNOWN
        states = [e for e in self.entries if e.name == model]
        if not states:
            return ABSENT
        for state in _STATE_ORDER:
            if any(e.state == state and not (state == UNAVAILABLE and _unloaded(e)) for e in states):
                return state
        return NOT_LOADED

    def ready_versions(self, model: str) -> tuple[str, ...]:
        return tuple(sorted(e.version for e in self.entries if e.name == model and e.state == READY and e.version))

    def reason(self, model: str) -> str:
        return "; ".join(
            e.reason for e in self.entries if e.name == model and e.state == UNAVAILABLE and not _unloaded(e)
        )

    def models(self) -> set[str]:
        return {e.name for e in self.entries}

    def ready_models(self) -> set[str]:
        return {e.name for e in self.entries if e.state == READY}


def _unloaded(entry: IndexEntry) -> bool:
    # Triton lists a model it has unloaded as UNAVAILABLE with the reason "unloaded": not an error.
    return entry.reason.strip().lower() == "unloaded"


def read_index(triton: TritonApi, hosts: Sequence[HostSpec], timeout_s: float) -> dict[str, HostIndex]:
    """Every host's index, in parallel; a host that fails has ``error`` set."""

    def one(host: HostSpec) -> HostIndex:
        try:
            return HostIndex(host, tuple(triton.index(host, timeout_s)))
        except OpsError as exc:
            return HostIndex(host, error=str(exc))

    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return {index.name: index for index in pool.map(one, hosts)}

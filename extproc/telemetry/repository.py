"""Which models a Triton host has READY: its repository index, read over gRPC (with TLS where
``envoy.upstream_tls`` is set, see :mod:`.tls`).

``inference.GRPCInferenceService/RepositoryIndex`` lists every model of the host's repository with one
entry per version, e.g. (Triton 2.51, explicit model control)::

    models { name: "add_one"  version: "1"  state: "READY" }
    models { name: "broken"  version: "1"  state: "UNAVAILABLE"  reason: "Internal: ..." }
    models { name: "idle_model"  version: "1"  state: "UNLOADING" }
    models { name: "never_loaded" }          # in the repository, never loaded: no version, no state
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import tritonclient.grpc.aio as triton_grpc

from extproc.admin_key import GRPC_HEADER
from extproc.datapath.batch_cost import Batching
from extproc.datapath.datastore import Datastore, HostState
from extproc.telemetry.tls import TritonTls

READY: Final = "READY"

# The index is small; what matters is that a restarted Triton is found again within a poll or two:
# gRPC's default reconnect backoff grows to 120 s, during which every call fails at once.
_CHANNEL_ARGS: Final[list[tuple[str, int]]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class ModelIndexEntry(Protocol):
    """The fields read from ``inference.RepositoryIndexResponse.ModelIndex``."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def state(self) -> str: ...


@dataclass(frozen=True, slots=True)
class RepositoryIndex:
    ready: dict[str, frozenset[str]]  # model → versions READY (strings, as Triton reports them)
    known: frozenset[str]  # every model listed, in any state


def index_from_models(models: Iterable[ModelIndexEntry]) -> RepositoryIndex:
    ready: dict[str, set[str]] = {}
    known: set[str] = set()
    for model in models:
        known.add(model.name)
        if model.state == READY and model.version:
            ready.setdefault(model.name, set()).add(model.version)
    return RepositoryIndex(
        ready={name: frozenset(versions) for name, versions in ready.items()},
        known=frozenset(known),
    )


def batching_from_config(config: Any) -> Batching:
    """How a model batches, from its ``inference.ModelConfig`` (as Triton returns it, auto-completed).

    Without a dynamic or sequence batcher Triton executes each request on its own, whatever
    ``max_batch_size`` says. A KIND_GPU instance group with ``gpus`` listed runs ``count`` instances on
    each of them."""
    batcher = config.HasField("dynamic_batching") or config.HasField("sequence_batching")
    max_batch = config.max_batch_size if batcher and config.max_batch_size > 0 else 1
    instances = sum(group.count * max(1, len(group.gpus)) for group in config.instance_group)
    instances = max(1, instances)
    if not config.HasField("sequence_batching"):
        return Batching(max_batch=max_batch, instances=instances)
    sequences = config.sequence_batching
    # The direct strategy (the default) gives each instance one slot per batch row; the oldest strategy
    # keeps max_candidate_sequences. Triton's default idle time is one second.
    slots = max(1, config.max_batch_size) * instances
    if sequences.HasField("oldest") and sequences.oldest.max_candidate_sequences > 0:
        slots = sequences.oldest.max_candidate_sequences
    idle_us = sequences.max_sequence_idle_microseconds or 1_000_000
    return Batching(
        max_batch=max_batch, instances=instances, sequence=True, sequence_slots=slots, sequence_idle_s=idle_us / 1e6
    )


def apply_index(datastore: Datastore, host: HostState, index: RepositoryIndex, now: float) -> None:
    datastore.update_index(host, index.ready, index.known, now)


class RepositoryClient:
    """One host's gRPC channel, opened on first use (inside the running event loop). ``admin_key``: the
    fleet's key, which the index (a model-repository API) needs on hosts that restrict it. ``tls``: the
    host speaks TLS (``envoy.upstream_tls``); None: plaintext."""

    def __init__(self, endpoint: str, admin_key: str | None = None, tls: TritonTls | None = None) -> None:
        self.endpoint = endpoint
        self._admin_headers = {GRPC_HEADER: admin_key} if admin_key is not None else None
        self._tls = tls
        self._client: Any = None

    def _connected(self) -> Any:
        if self._client is None:
            if self._tls is None:
                self._client = triton_grpc.InferenceServerClient(url=self.endpoint, channel_args=_CHANNEL_ARGS)
            else:
                self._client = triton_grpc.InferenceServerClient(
                    url=self.endpoint,
                    creds=self._tls.credentials,
                    channel_args=[*_CHANNEL_ARGS, *self._tls.channel_args()],
                )
        return self._client

    async def index(self, timeout_s: float) -> RepositoryIndex:
        """Read the index; raises (``InferenceServerException``) on an error or after ``timeout_s``."""
        response = await self._connected().get_model_repository_index(
            headers=self._admin_headers, client_timeout=timeout_s
        )
        return index_from_models(response.models)

    async def batching(self, model: str, timeout_s: float) -> Batching:
        """Read the model's config; raises as :meth:`index` does."""
        response = await self._connected().get_model_config(model, client_timeout=timeout_s)
        return batching_from_config(response.config)

    async def load(self, model: str, timeout_s: float) -> None:
        """Load ``model`` (its versions per its version policy; Triton runs its warm-up before it answers);
        raises as :meth:`index` does, with Triton's reason where it gives one."""
        await self._connected().load_model(model, headers=self._admin_headers, client_timeout=timeout_s)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

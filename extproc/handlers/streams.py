"""Long-lived inference streams open per client, so that one client cannot hold the gateway's memory.

A gRPC ``ModelStreamInfer`` stream lives as long as its client keeps it open, and holds memory in Envoy, in
the picker (its ext_proc stream) and in Triton all that time: a client opening thousands of them grows all
three. The picker counts the streams open per client key (the header Envoy sets, see
:mod:`extproc.datapath.scheduling.fairness`) and refuses a client's stream beyond ``picker.max_streams_per_client``
(429, gRPC ``RESOURCE_EXHAUSTED``) before it reaches a host. Unary calls are not counted: they end with
their answer, and admission bounds them.
"""

from __future__ import annotations

from extproc.datapath.scheduling.types import Reject

__all__ = ["OpenStreams"]


class OpenStreams:
    """Streams open per client key, in this picker process."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._open: dict[str, int] = {}

    def open(self, client: str) -> Reject | None:
        """Count a new stream of ``client``'s, or the refusal if it has its share open already."""
        count = self._open.get(client, 0)
        if count >= self.per_client:
            return Reject(
                429,
                f"this client has {count} inference streams open through the gateway, the most one client may; "
                "close one before opening another",
                "streams_per_client",
                retry_after=True,
            )
        self._open[client] = count + 1
        return None

    def close(self, client: str) -> None:
        left = self._open[client] - 1
        if left:
            self._open[client] = left
        else:
            del self._open[client]

"""seq_accumulate: OUTPUT = the sum of INPUT over the requests of one sequence so far.

State is a dict keyed by correlation ID (the CORRID control tensor). START resets the sum, END forgets
the sequence after answering, and a request without START for an unknown ID gets an error response:
the sequence began on another server (or was forgotten), and silently restarting at 0 would hide that.
Triton's sequence batcher usually rejects such a request before it reaches the model; this check is the
second line of defence (e.g. after this model's own idle eviction).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]


def _flag(request: Any, name: str) -> bool:
    return bool(pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        idle_us = int(config["sequence_batching"].get("max_sequence_idle_microseconds", 60_000_000))
        # Triton drops sequences idle longer than this; forget ours a bit later so state cannot leak.
        self._evict_after_s = 2 * idle_us / 1e6
        self._sums: dict[int, float] = {}
        self._seen: dict[int, float] = {}

    def _evict_idle(self, now: float) -> None:
        for corrid in [c for c, seen in self._seen.items() if now - seen > self._evict_after_s]:
            del self._seen[corrid]
            self._sums.pop(corrid, None)

    def execute(self, requests: list[Any]) -> list[Any]:
        now = time.monotonic()
        self._evict_idle(now)
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy().astype(np.float64)
            if not _flag(request, "READY"):
                # A slot with no request in it: answer without touching any state.
                responses.append(pb_utils.InferenceResponse(output_tensors=[]))
                continue
            corrid = int(pb_utils.get_input_tensor_by_name(request, "CORRID").as_numpy().reshape(-1)[0])
            if _flag(request, "START"):
                total = 0.0
            elif corrid in self._sums:
                total = self._sums[corrid]
            else:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(
                            f"seq_accumulate: unknown sequence {corrid}: the request has no START flag and "
                            "this server holds no state for it (did the sequence move to another server?)",
                            pb_utils.TritonError.NOT_FOUND,
                        )
                    )
                )
                continue
            total += float(x.sum())
            if _flag(request, "END"):
                self._sums.pop(corrid, None)
                self._seen.pop(corrid, None)
            else:
                self._sums[corrid] = total
                self._seen[corrid] = now
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("OUTPUT", np.full((x.shape[0], 1), total, np.float32))]
                )
            )
        return responses

    def finalize(self) -> None:
        self._sums.clear()
        self._seen.clear()

"""timed_batch: OUTPUT0 = INPUT0 * 2 + 1, taking (8 ms + 2 ms x batch) x factor per execute() call.

``batch`` is the number of items in the call (the sum of the requests' batch dimensions). ``factor`` is
read once, in initialize(), from the environment variable EXTPROC_SERVICE_TIME_FACTOR (default 1.0):
the python backend stub is a child process of tritonserver and inherits its environment, so each
tritonserver process (one emulated host) gets its own speed.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

FACTOR_ENV = "EXTPROC_SERVICE_TIME_FACTOR"
BASE_S = 0.008
PER_ITEM_S = 0.002


def service_time_factor() -> float:
    raw = os.environ.get(FACTOR_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"{FACTOR_ENV}={raw!r} is not a number") from None
    if not 0 < factor <= 1000:
        raise ValueError(f"{FACTOR_ENV}={raw!r} must be in (0, 1000]")
    return factor


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        self._factor = service_time_factor()
        pb_utils.Logger.log_info(f"timed_batch: service time factor {self._factor}")

    def execute(self, requests: list[Any]) -> list[Any]:
        started = time.perf_counter()
        inputs = [pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy() for request in requests]
        batch = sum(x.shape[0] for x in inputs)
        outputs = [(x * np.float32(2) + np.float32(1)).astype(np.float32) for x in inputs]
        remaining = (BASE_S + PER_ITEM_S * batch) * self._factor - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", y)]) for y in outputs]

    def finalize(self) -> None:
        pass

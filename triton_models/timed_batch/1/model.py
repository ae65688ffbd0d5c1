"""timed_batch: OUTPUT0 = INPUT0 * 2 + 1, taking (8 ms + 2 ms x batch) x factor per execute() call.

``batch`` is the number of items in the call (the sum of the requests' batch dimensions). ``factor`` is
read in initialize() from the environment variable EXTPROC_SERVICE_TIME_FACTOR (default 1.0): the python
backend stub is a child process of tritonserver and inherits its environment, so each tritonserver process
(one emulated host) gets its own speed. Where EXTPROC_SERVICE_TIME_FILE names a file, a factor written
there replaces it from the next execute() on (read again whenever the file's mtime changes): a benchmark
slows a host down mid-run that way.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

FACTOR_ENV = "EXTPROC_SERVICE_TIME_FACTOR"
FACTOR_FILE_ENV = "EXTPROC_SERVICE_TIME_FILE"
BASE_S = 0.008
PER_ITEM_S = 0.002


def service_time_factor() -> float:
    raw = os.environ.get(FACTOR_ENV, "").strip()
    return parse_factor(raw, FACTOR_ENV) if raw else 1.0


def parse_factor(raw: str, source: str) -> float:
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"{source}={raw!r} is not a number") from None
    if not 0 < factor <= 1000:
        raise ValueError(f"{source}={raw!r} must be in (0, 1000]")
    return factor


class FactorFile:
    """The factor a benchmark writes while the model runs; ``read`` keeps the last good one."""

    def __init__(self, path: str, factor: float) -> None:
        self._path = Path(path)
        self._mtime: int | None = None
        self.factor = factor

    def read(self) -> float:
        try:
            mtime = self._path.stat().st_mtime_ns
        except OSError:
            return self.factor
        if mtime != self._mtime:
            self._mtime = mtime
            try:
                self.factor = parse_factor(self._path.read_text(encoding="utf-8").strip(), str(self._path))
            except (OSError, ValueError) as exc:
                pb_utils.Logger.log_warn(f"timed_batch: {exc}; keeping factor {self.factor}")
        return self.factor


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        factor = service_time_factor()
        path = os.environ.get(FACTOR_FILE_ENV, "").strip()
        self._file = FactorFile(path, factor) if path else None
        self._factor = factor
        pb_utils.Logger.log_info(f"timed_batch: service time factor {factor}" + (f", then {path}" if path else ""))

    def execute(self, requests: list[Any]) -> list[Any]:
        started = time.perf_counter()
        inputs = [pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy() for request in requests]
        batch = sum(x.shape[0] for x in inputs)
        outputs = [(x * np.float32(2) + np.float32(1)).astype(np.float32) for x in inputs]
        factor = self._file.read() if self._file is not None else self._factor
        remaining = (BASE_S + PER_ITEM_S * batch) * factor - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", y)]) for y in outputs]

    def finalize(self) -> None:
        pass

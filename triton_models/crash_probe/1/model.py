"""crash_probe: OUTPUT0 = INPUT0; a request holding the value 13.0 kills the tritonserver that runs it.

The python backend runs this code in a stub process whose parent is the tritonserver process: killing the
parent is what a crashing server looks like from outside (its connections reset, its port closes).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

MAGIC = 13.0


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if np.any(x == MAGIC):
                os.kill(os.getppid(), signal.SIGKILL)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x.astype(np.float32))]))
        return responses

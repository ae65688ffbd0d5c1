"""embed_normalize: INPUT FP32 [B, D] -> OUTPUT FP32 [B, D] (unit L2 norm per row), NORM FP32 [B, 1].

Norms are computed in float64 (no overflow for large float32 values); a zero row stays zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]


def normalize(x: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    wide = x.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", wide, wide)).reshape(-1, 1)
    unit = np.divide(wide, norms, out=np.zeros_like(wide), where=norms > 0)
    return unit.astype(np.float32), norms.astype(np.float32)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        pass

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            # Rows of one request share a dimension; requests in one call may differ, so one at a time.
            x = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            if x.ndim != 2:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"INPUT must be [batch, dim], got shape {list(x.shape)}")
                    )
                )
                continue
            unit, norms = normalize(x)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("OUTPUT", unit), pb_utils.Tensor("NORM", norms)]
                )
            )
        return responses

    def finalize(self) -> None:
        pass

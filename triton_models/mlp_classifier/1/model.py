"""mlp_classifier: INPUT0 FP32 [B, 16] -> PROBS FP32 [B, 4] (softmax), LABEL INT64 [B, 1] (argmax).

The weights are drawn from ``np.random.default_rng(SEED)`` in the order w1, b1, w2, b2 (see ``weights``);
tests recompute the expected output from the same recipe. All requests of one execute() call are
stacked and run as one matrix product (real batching).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

SEED = 20240607
N_IN, N_HIDDEN, N_CLASSES = 16, 32, 4

F32 = npt.NDArray[np.float32]


def weights(seed: int = SEED) -> tuple[F32, F32, F32, F32]:
    """He-initialised weights and small biases, all float32."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((N_IN, N_HIDDEN)) * np.sqrt(2.0 / N_IN)).astype(np.float32)
    b1 = (rng.standard_normal(N_HIDDEN) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((N_HIDDEN, N_CLASSES)) * np.sqrt(2.0 / N_HIDDEN)).astype(np.float32)
    b2 = (rng.standard_normal(N_CLASSES) * 0.1).astype(np.float32)
    return w1, b1, w2, b2


def forward(x: F32, params: tuple[F32, F32, F32, F32]) -> tuple[F32, npt.NDArray[np.int64]]:
    w1, b1, w2, b2 = params
    hidden = np.maximum(x @ w1 + b1, np.float32(0))
    logits = hidden @ w2 + b2
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
    labels = probs.argmax(axis=1).astype(np.int64).reshape(-1, 1)
    return probs, labels


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        self._params = weights()

    def execute(self, requests: list[Any]) -> list[Any]:
        inputs = [
            pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy().astype(np.float32, copy=False)
            for request in requests
        ]
        probs, labels = forward(np.concatenate(inputs, axis=0), self._params)
        responses = []
        start = 0
        for x in inputs:
            stop = start + x.shape[0]
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("PROBS", probs[start:stop]),
                        pb_utils.Tensor("LABEL", labels[start:stop]),
                    ]
                )
            )
            start = stop
        return responses

    def finalize(self) -> None:
        pass

"""Expected outputs of the models in triton_models/, recomputed independently with numpy."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


def mlp_expected(x: F32) -> tuple[F32, npt.NDArray[np.int64]]:
    """The recipe documented in triton_models/mlp_classifier/1/model.py, recomputed independently."""
    rng = np.random.default_rng(20240607)
    w1 = (rng.standard_normal((16, 32)) * np.sqrt(2.0 / 16)).astype(np.float32)
    b1 = (rng.standard_normal(32) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((32, 4)) * np.sqrt(2.0 / 32)).astype(np.float32)
    b2 = (rng.standard_normal(4) * 0.1).astype(np.float32)
    logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return probs, probs.argmax(axis=1).astype(np.int64).reshape(-1, 1)

"""What an emulated Triton host serves, built from the pages recorded from a real one (``recorded/``).

- :class:`PageTemplate`: the recorded ``/metrics`` page compiled into static text and numeric slots. Each
  per-model counter that a request advances (``nv_inference_request_success``, ``_count``, ``_exec_count``
  and the ``*_duration_us`` families) becomes a slot whose value is the recorded one plus, per request
  served since, the per-request increment the recorded page shows for that model (the mean of the models
  that served requests, for those that did not). Everything else (failures, pending, CPU, pinned memory)
  is served as recorded. Rendering a page is one ``str.join``.
- :func:`gpu_page`: the GPU-shaped page, synthesised from the recorded one in Triton's format as a GPU build
  writes it: per-model series labelled ``gpu_uuid`` (first, Triton sorts label names) and the ``nv_gpu_*``
  and ``nv_energy_consumption`` families per GPU. ``python -m benchmarks.fleet.record`` writes it to
  ``recorded/metrics_gpu.txt``; :data:`GPU_UTILIZATION` is a slot that follows the request rate.
- :func:`repository_index` / :func:`model_configs`: the recorded gRPC answers as protobuf messages.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

RECORDED_DIR: Final = Path(__file__).resolve().parent / "recorded"
CPU_PAGE: Final = RECORDED_DIR / "metrics.txt"
GPU_PAGE: Final = RECORDED_DIR / "metrics_gpu.txt"

# Families a served request advances (cumulative, per model).
ADVANCING: Final = (
    "nv_inference_request_success",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)
GPU_UTILIZATION: Final = "nv_gpu_utilization"
# A request's share of a GPU's time, for the utilization gauge (0.2 % a request: 500 req/s fill a GPU).
_UTIL_PER_REQUEST: Final = 0.002
_MODEL_LABEL: Final = re.compile(r'model="([^"]*)"')
_SAMPLE: Final = re.compile(r"^(nv_[a-z_]+)(\{[^}]*\})? (\S+)$")

# Two GPUs of 80 GiB, as an H100 host shows them.
GPU_UUIDS: Final = ("GPU-6c1b5e0a-4d2f-8a77-3f1e-92c4b0d17a01", "GPU-9a0f3c11-7e52-41b8-b6d0-5e83a2c9f402")
_GPU_TOTAL_BYTES: Final = 85520809984
_GPU_USED_BYTES: Final = 21474836480
_GPU_FAMILIES: Final = (
    ("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", "gauge", "0"),
    ("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", "gauge", str(_GPU_TOTAL_BYTES)),
    ("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", "gauge", str(_GPU_USED_BYTES)),
    ("nv_gpu_power_usage", "GPU power usage in watts", "gauge", "71.118"),
    ("nv_gpu_power_limit", "GPU power management limit in watts", "gauge", "700"),
    ("nv_energy_consumption", "GPU energy consumption in joules since the Triton Server started", "counter", "0"),
)


def gpu_page(cpu_page: str) -> str:
    """The GPU-shaped page: ``cpu_page``'s per-model series once per GPU with a ``gpu_uuid`` label, then the
    per-GPU families (before the CPU ones, where Triton writes them)."""
    out: list[str] = []
    gpu_done = False
    for line in cpu_page.splitlines():
        if line.startswith(("# HELP nv_pinned", "# HELP nv_cpu")) and not gpu_done:
            for name, help_text, kind, value in _GPU_FAMILIES:
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                out += [f'{name}{{gpu_uuid="{uuid}"}} {value}' for uuid in GPU_UUIDS]
            gpu_done = True
        match = _SAMPLE.match(line)
        if match and match.group(2) and 'model="' in match.group(2):
            name, labels, value = match.groups()
            out += [f'{name}{{gpu_uuid="{uuid}",{labels[1:]} {value}' for uuid in GPU_UUIDS]
        else:
            out.append(line)
    return "\n".join(out) + "\n"


@dataclass(frozen=True, slots=True)
class _Slot:
    model: str  # "" for the GPU utilization gauge
    base: float
    per_request: float


class PageTemplate:
    """A recorded page compiled for cheap rendering: ``render(served)`` with ``served`` the requests each
    model served since the recording (a dict model → count)."""

    def __init__(self, text: str) -> None:
        lines = text.splitlines()
        # Per-request increments: recorded value / recorded successes, per (family, model).
        values: dict[tuple[str, str], float] = {}
        for line in lines:
            match = _SAMPLE.match(line)
            if match is None or match.group(1) not in ADVANCING or match.group(2) is None:
                continue
            model = _MODEL_LABEL.search(match.group(2))
            if model is not None:
                key = (match.group(1), model.group(1))
                values[key] = values.get(key, 0.0) + float(match.group(3))
        self.models: tuple[str, ...] = tuple(dict.fromkeys(m for _, m in values))
        served = {m: values.get(("nv_inference_request_success", m), 0.0) for m in self.models}
        per_request: dict[tuple[str, str], float] = {}
        for family in ADVANCING:
            rates = [values.get((family, m), 0.0) / served[m] for m in self.models if served[m] > 0]
            mean = sum(rates) / len(rates) if rates else 1.0
            for m in self.models:
                per_request[(family, m)] = values.get((family, m), 0.0) / served[m] if served[m] > 0 else mean
        self.gpus = sum(1 for line in lines if line.startswith(GPU_UTILIZATION + "{"))
        self._pieces: list[str] = []
        self._slots: list[tuple[int, _Slot]] = []
        static: list[str] = []
        for line in lines:
            match = _SAMPLE.match(line)
            slot: _Slot | None = None
            if match is not None and match.group(2) is not None:
                family, labels, value = match.groups()
                model = _MODEL_LABEL.search(labels)
                if family in ADVANCING and model is not None:
                    slot = _Slot(model.group(1), float(value), per_request[(family, model.group(1))])
                elif family == GPU_UTILIZATION:
                    slot = _Slot("", float(value), _UTIL_PER_REQUEST)
            if slot is None:
                static.append(line + "\n")
                continue
            static.append(f"{match.group(1)}{match.group(2)} ")  # type: ignore[union-attr]
            self._pieces.append("".join(static))
            static = ["\n"]
            self._slots.append((len(self._pieces), slot))
            self._pieces.append("")
        self._pieces.append("".join(static))

    def render(self, served: dict[str, float], rate: float = 0.0) -> bytes:
        """The page after ``served[model]`` requests per model; ``rate``: the host's requests/s now (for the
        GPU utilization gauge)."""
        pieces = self._pieces
        for index, slot in self._slots:
            if slot.model:
                pieces[index] = str(round(slot.base + slot.per_request * served.get(slot.model, 0.0)))
            else:
                pieces[index] = f"{min(0.99, slot.base + slot.per_request * rate / max(1, self.gpus)):g}"
        return "".join(pieces).encode()


def load_template(gpu: bool) -> PageTemplate:
    return PageTemplate((GPU_PAGE if gpu else CPU_PAGE).read_text(encoding="utf-8"))


def repository_index() -> Any:
    """The recorded ``RepositoryIndexResponse``."""
    from google.protobuf import json_format
    from tritonclient.grpc import service_pb2

    doc = json.loads((RECORDED_DIR / "repository_index.json").read_text(encoding="utf-8"))
    return json_format.ParseDict(doc, service_pb2.RepositoryIndexResponse())


def model_configs() -> dict[str, Any]:
    """Model name → the recorded ``ModelConfigResponse``."""
    from google.protobuf import json_format
    from tritonclient.grpc import service_pb2

    configs = {}
    for path in sorted((RECORDED_DIR / "model_config").glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        configs[path.stem] = json_format.ParseDict(doc, service_pb2.ModelConfigResponse())
    return configs

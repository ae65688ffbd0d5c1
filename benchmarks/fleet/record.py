"""``python -m benchmarks.fleet.record``: record what a real Triton host serves, for the fleet emulator.

Starts one real ``tritonserver`` with the repository's own tooling (:mod:`extproc.runtime.triton`, as
``extproc up`` does) on free loopback ports with several models of ``triton_models/`` loaded, sends each a
few REST inferences so that its ``nv_inference_*`` counters are non-zero, then writes under
``benchmarks/fleet/recorded/``:

- ``metrics.txt``: its ``/metrics`` page, as served (Prometheus text format);
- ``repository_index.json``: its gRPC ``RepositoryIndex`` answer (protobuf JSON);
- ``model_config/<model>.json``: each loaded model's gRPC ``ModelConfig`` answer (protobuf JSON,
  auto-completed by Triton).

The ``nv_gpu_*`` page (``metrics_gpu.txt``) is not recorded: this machine has no GPU. It is synthesised from
``metrics.txt`` in Triton's format (:func:`benchmarks.fleet.pages.gpu_page`); ``--gpu-page-only`` rewrites
just that file.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Final

from benchmarks import REPO_ROOT

RECORDED_DIR: Final = Path(__file__).resolve().parent / "recorded"
MODELS: Final = ("embed_normalize", "mlp_classifier", "timed_batch", "seq_accumulate")
_REQUESTS: Final = {
    "embed_normalize": '{"inputs":[{"name":"INPUT","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}',
    "mlp_classifier": '{"inputs":[{"name":"INPUT0","shape":[1,16],"datatype":"FP32","data":['
    + ",".join(["0.5"] * 16)
    + "]}]}",
}


def _post(url: str, body: str) -> None:
    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except OSError as exc:
        print(f"[record] {url}: {exc}", file=sys.stderr)


def write_gpu_page() -> None:
    """``recorded/metrics_gpu.txt`` from ``recorded/metrics.txt`` (:func:`benchmarks.fleet.pages.gpu_page`)."""
    from benchmarks.fleet.pages import CPU_PAGE, GPU_PAGE, gpu_page

    GPU_PAGE.write_text(gpu_page(CPU_PAGE.read_text(encoding="utf-8")), encoding="utf-8")


def main() -> int:
    if sys.argv[1:] == ["--gpu-page-only"]:
        write_gpu_page()
        return 0
    import subprocess

    import tritonclient.grpc as grpcclient
    from google.protobuf import json_format

    from benchmarks.ports import free_ports
    from extproc.runtime.triton import prepare_backend_dir, triton_command, triton_env

    http_port, grpc_port, metrics_port = free_ports(3)
    with tempfile.TemporaryDirectory(prefix="extproc-record-") as tmp:
        argv = triton_command(
            model_repository=REPO_ROOT / "triton_models",
            backend_dir=prepare_backend_dir(Path(tmp)),
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            models=MODELS,
        )
        log = (Path(tmp) / "triton.log").open("wb")
        proc = subprocess.Popen(argv, env=triton_env(1.0), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"Triton did not become ready; log: {tmp}/triton.log")
                time.sleep(0.5)
            for model, body in _REQUESTS.items():
                for _ in range(5):
                    _post(f"http://127.0.0.1:{http_port}/v2/models/{model}/infer", body)
            time.sleep(1.0)  # a metrics interval or more
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                page = r.read().decode()
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            index = client.get_model_repository_index(as_json=False)
            configs = {m: client.get_model_config(m, as_json=False) for m in MODELS}
            client.close()
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
    RECORDED_DIR.mkdir(parents=True, exist_ok=True)
    (RECORDED_DIR / "metrics.txt").write_text(page, encoding="utf-8")
    (RECORDED_DIR / "repository_index.json").write_text(
        json.dumps(json_format.MessageToDict(index, preserving_proto_field_name=True), indent=1) + "\n"
    )
    config_dir = RECORDED_DIR / "model_config"
    config_dir.mkdir(exist_ok=True)
    for model, config in configs.items():
        (config_dir / f"{model}.json").write_text(
            json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True), indent=1) + "\n"
        )
    write_gpu_page()
    print(f"[record] wrote {RECORDED_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

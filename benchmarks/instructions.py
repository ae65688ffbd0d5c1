"""``python -m benchmarks.instructions``: the picker's request path in instructions, which noise does not move.

On a shared machine, timings of a few microseconds vary by 2x from one run to the next; an instruction count
does not. This runs the in-process edge (Envoy's ProcessingRequest in, parse, decide, answer, record) and
each of its parts under ``valgrind --tool=callgrind`` twice, for ``--iterations`` and five times as many,
and reports the difference per request: start-up and imports cancel out. Instructions are not time (a cache
miss costs more than an add), but a change that removes instructions from the path removes time from it.

The fleet is :func:`benchmarks.decision.synthetic_fleet` (``--hosts`` hosts, argmax), and the request a
small REST inference request with the headers Envoy forwards to the picker; the hosts' in-flight estimates
restart from their Envoy counts every ``POLL_EVERY`` requests, counted with them (see
:mod:`benchmarks.decision`). Parts: ``edge`` (one ext_proc
stream as gRPC runs it: the request's bytes to ``Processor.Process``, the answer serialised), ``headers``
(the request-headers message read from its bytes), ``request`` (the InferenceRequest from the path and
headers), ``decide``, ``answer`` (the ProcessingResponse) and ``record`` (the decision's metrics).

``--processes`` counts the two processors of ``python -m benchmarks.overhead`` instead (the bare constant-answer
processor and the picker's request path, each its own grpc.aio server process under callgrind), driven one
stream at a time by a gRPC client over a Unix socket: gRPC's and asyncio's work included, Envoy left out.
Their ratio is the instruction-count analogue of the overhead benchmark's throughput ratio (kernel time is
not counted). The picker's stand-in collector refreshes the datastore every 200 ms of wall time, which
under valgrind's slowdown adds a little to each request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from benchmarks import child_env, quiet_logs

PARTS: Final = ("edge", "headers", "request", "decide", "answer", "record")
_COLLECTED = re.compile(r"Collected : (\d+)")
VALGRIND_HINT: Final = "valgrind is not installed: `apt-get install -y valgrind` (Debian/Ubuntu)"
# One hash seed for every counted process: with random ones, dict and set layouts differ from run to run and
# the same code's count per request moved by up to 1.4k instructions.
_ENV: Final = {**os.environ, "PYTHONHASHSEED": "0"}


def part_runner(part: str, n_hosts: int) -> Callable[[int], None]:
    """A function that runs ``part`` of the request path n times."""
    from benchmarks.decision import POLL_EVERY, every, one_stream, poll_envoy, rest_request_bytes, synthetic_fleet
    from extproc.datapath.metrics import PickerMetrics
    from extproc.datapath.protocol.request import rest_request
    from extproc.datapath.protocol.response import Responder
    from extproc.datapath.protocol.wire import read_request_headers
    from extproc.datapath.scheduling.scheduler import Scheduler
    from extproc.handlers.server import Processor

    fleet, store = synthetic_fleet(n_hosts, "argmax")
    scheduler = Scheduler(fleet, store)
    metrics = PickerMetrics(store)
    processor = Processor(fleet, scheduler, metrics)
    # The processor's own kind of responder, for the answer and record parts on their own.
    responder = Responder(metrics, fleet.picker.retry_after_s, debug=False)
    payload = rest_request_bytes("mlp")
    first = read_request_headers(payload)
    assert first is not None
    headers = first.headers
    request = rest_request(headers[":path"], headers)
    decision = scheduler.decide(request)

    # Envoy's counts read back every few requests, counted with them: nothing answers the picks, which
    # would otherwise pile up until every request was refused as overloaded (see benchmarks.decision).
    poll = every(POLL_EVERY, lambda: poll_envoy(store))

    async def streams(n: int) -> None:
        for _ in range(n):
            poll()
            await one_stream(processor, payload)

    def decide() -> object:
        poll()
        return scheduler.decide(request)

    once: dict[str, Callable[[], object]] = {
        "headers": lambda: read_request_headers(payload),
        "request": lambda: rest_request(headers[":path"], headers),
        "decide": decide,
        "answer": lambda: responder.answer(decision, request),
        "record": lambda: responder.record(decision, request, headers.get("x-request-id"), 0.0),
    }
    if part == "edge":
        loop = asyncio.new_event_loop()
        return lambda n: loop.run_until_complete(streams(n))
    step = once[part]

    def repeat(n: int) -> None:
        for _ in range(n):
            step()

    return repeat


def parse_collected(valgrind_output: str) -> int:
    match = _COLLECTED.search(valgrind_output)
    if match is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{valgrind_output[-2000:]}")
    return int(match.group(1))


def per_request(short: int, long: int, extra_requests: int) -> int:
    """Instructions per request from two runs that differ only by ``extra_requests`` requests."""
    return round((long - short) / extra_requests)


def callgrind(valgrind: str) -> list[str]:
    """The command prefix that counts a program's instructions (and writes no profile)."""
    return [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null"]


def _count(valgrind: str, part: str, n: int, n_hosts: int) -> int:
    argv = [*callgrind(valgrind), sys.executable, "-m", "benchmarks.instructions"]
    result = subprocess.run(
        [*argv, "--run", part, str(n), str(n_hosts)],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
        env=child_env(_ENV),
    )
    if result.returncode != 0:
        raise RuntimeError(f"{part} x{n} failed under valgrind:\n{result.stderr[-2000:]}")
    return parse_collected(result.stderr)


def _drive(listen: str, n: int) -> None:
    """``n`` ext_proc streams of one request-headers message each, one after the other."""
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

    from benchmarks.decision import rest_request_bytes

    first = ep.ProcessingRequest.FromString(rest_request_bytes("mlp"))
    with grpc.insecure_channel(listen) as channel:
        stub = ep_grpc.ExternalProcessorStub(channel)
        for _ in range(n):
            answers = list(stub.Process(iter([first]), timeout=120))
            if len(answers) != 1 or not answers[0].HasField("request_headers"):
                raise RuntimeError(f"unexpected answer from the processor: {answers}")


def count_process(valgrind: Sequence[str], variant: str, n: int, workdir: Path) -> int:
    """Instructions the processor ``variant`` ran, start to stop, serving ``n`` streams; ``valgrind`` is the
    command line that counts them (see :func:`callgrind`)."""
    from benchmarks.overhead.stack import READY_LINE, bench_fleet

    listen = f"unix:{workdir / variant}.sock"
    argv = [*valgrind, sys.executable, "-m", "benchmarks.overhead.server", variant, "--listen", listen]
    if variant == "picker":
        # Three hosts on ports nobody serves: nothing is sent to them, the picker only decides.
        fleet = bench_fleet([1, 2, 3], [4, 5, 6, 7, 8, 9], listen, 10, 11)
        config = workdir / "fleet.yaml"
        config.write_text(fleet.model_dump_json(), encoding="utf-8")
        argv += ["--config", str(config)]
    stderr = workdir / f"{variant}-{n}.err"
    with stderr.open("w") as err:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=child_env(_ENV))
        try:
            assert process.stdout is not None
            line = process.stdout.readline()  # blocks until READY (minutes at most under valgrind) or exit
            if line.strip() != READY_LINE:
                raise RuntimeError(f"the {variant} processor did not start:\n{stderr.read_text()[-2000:]}")
            _drive(listen, n)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=300)
    return parse_collected(stderr.read_text())


def processes(valgrind: str, iterations: int) -> int:
    print(
        f"instructions per request, whole processor process, {_build()}"
        f" (callgrind; x{iterations} and x{5 * iterations})"
    )
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="extproc-instructions-") as tmp:
        for variant in ("bare", "picker"):
            print(f"[bench instructions] {variant} processor ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            short = count_process(callgrind(valgrind), variant, iterations, Path(tmp))
            long = count_process(callgrind(valgrind), variant, 5 * iterations, Path(tmp))
            counts[variant] = per_request(short, long, 4 * iterations)
            print(f"{variant:>8} {counts[variant]:>9,}  ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"bare / picker: {counts['bare'] / counts['picker']:.3f}")
    return 0


def _build() -> str:
    from extproc.build import compiled

    return "compiled (mypyc)" if compiled() else "plain Python"


def count(parts: Sequence[str], n_hosts: int, iterations: int, whole_processes: bool = False) -> int:
    """Counts and prints the instructions per request of each part (or of the two processor processes)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print(VALGRIND_HINT, file=sys.stderr)
        return 2
    if whole_processes:
        return processes(valgrind, iterations)
    print(
        f"instructions per request, in-process, {n_hosts} hosts, {_build()}"
        f" (callgrind; x{iterations} and x{5 * iterations})"
    )
    for part in parts:
        print(f"[bench instructions] {part} ...", file=sys.stderr, flush=True)
        short = _count(valgrind, part, iterations, n_hosts)
        long = _count(valgrind, part, 5 * iterations, n_hosts)
        print(f"{part:>8} {per_request(short, long, 4 * iterations):>9,}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 4 and args[0] == "--run":
        # Internal: what runs under valgrind (python -m benchmarks.instructions --run PART N HOSTS).
        part_runner(args[1], int(args[3]))(int(args[2]))
        return 0
    quiet_logs()  # not under valgrind: the counted runs keep structlog's defaults, as they always did
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.instructions",
        description="The in-process request path in instructions per request (valgrind; noise-free).",
    )
    parser.add_argument("--hosts", type=int, default=3, help="hosts of the synthetic fleet (default 3)")
    parser.add_argument("--iterations", type=int, default=1000, help="requests in the shorter of the two runs")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts of the request path")
    parser.add_argument(
        "--processes", action="store_true", help="instead: the bare and the picker processor processes, over gRPC"
    )
    parsed = parser.parse_args(args)
    return count(parsed.parts, parsed.hosts, parsed.iterations, parsed.processes)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``extproc bench instructions``: the picker's request path in instructions, which noise does not move.

On a shared machine, timings of a few microseconds vary by 2x from one run to the next; an instruction count
does not. This runs the in-process edge (Envoy's ProcessingRequest in, parse, decide, answer, record) and
each of its parts under ``valgrind --tool=callgrind`` twice, for ``--iterations`` and five times as many,
and reports the difference per request: start-up and imports cancel out. Instructions are not time (a cache
miss costs more than an add), but a change that removes instructions from the path removes time from it.

The fleet is :func:`extproc.bench.decision.synthetic_fleet` (``--hosts`` hosts, argmax), and the request a
small REST inference request. Parts: ``edge`` (the whole ``Processor.Process`` of one request), ``headers``
(the header map), ``request`` (the InferenceRequest from the path and headers), ``decide``, ``answer`` (the
ProcessingResponse) and ``record`` (the decision's metrics).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final

PARTS: Final = ("edge", "headers", "request", "decide", "answer", "record")
_COLLECTED = re.compile(r"Collected : (\d+)")
VALGRIND_HINT: Final = "valgrind is not installed: `apt-get install -y valgrind` (Debian/Ubuntu)"


class _OneMessage:
    """The request side of one ext_proc stream: its request-headers message, then the end."""

    def __init__(self, message: object) -> None:
        self._message: object | None = message

    def __aiter__(self) -> _OneMessage:
        return self

    async def __anext__(self) -> object:
        message, self._message = self._message, None
        if message is None:
            raise StopAsyncIteration
        return message


def part_runner(part: str, n_hosts: int) -> Callable[[int], None]:
    """A function that runs ``part`` of the request path n times."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    from extproc.bench.decision import rest_request_bytes, synthetic_fleet
    from extproc.handlers import server
    from extproc.metrics import PickerMetrics
    from extproc.scheduling.scheduler import Scheduler

    fleet, store = synthetic_fleet(n_hosts, "argmax")
    scheduler = Scheduler(fleet, store)
    processor = server.Processor(fleet, scheduler, PickerMetrics(store))
    first = ep.ProcessingRequest.FromString(rest_request_bytes("mlp"))
    headers = server._header_map(first.request_headers.headers.headers)
    request = processor._rest_request(headers[":path"], headers)
    decision = scheduler.decide(request)

    async def streams(n: int) -> None:
        for _ in range(n):
            stream: AsyncIterator[object] = processor.Process(_OneMessage(first), None)  # type: ignore[arg-type]
            async for _ in stream:
                pass

    once: dict[str, Callable[[], object]] = {
        "headers": lambda: server._header_map(first.request_headers.headers.headers),
        "request": lambda: processor._rest_request(headers[":path"], headers),
        "decide": lambda: scheduler.decide(request),
        "answer": lambda: processor._answer(decision, request, headers),
        "record": lambda: processor._record(decision, request, headers, 0.0),
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


def _count(valgrind: str, part: str, n: int, n_hosts: int) -> int:
    argv = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m", __name__]
    result = subprocess.run(
        [*argv, "--run", part, str(n), str(n_hosts)], capture_output=True, text=True, check=False, timeout=1800
    )
    if result.returncode != 0:
        raise RuntimeError(f"{part} x{n} failed under valgrind:\n{result.stderr[-2000:]}")
    return parse_collected(result.stderr)


def main(parts: Sequence[str], n_hosts: int, iterations: int) -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print(VALGRIND_HINT, file=sys.stderr)
        return 2
    print(f"instructions per request, in-process, {n_hosts} hosts (callgrind; x{iterations} and x{5 * iterations})")
    for part in parts:
        print(f"[bench instructions] {part} ...", file=sys.stderr, flush=True)
        short = _count(valgrind, part, iterations, n_hosts)
        long = _count(valgrind, part, 5 * iterations, n_hosts)
        print(f"{part:>8} {per_request(short, long, 4 * iterations):>9,}", flush=True)
    return 0


if __name__ == "__main__":
    # Internal: what runs under valgrind (python -m extproc.bench.instructions --run PART N HOSTS).
    if len(sys.argv) == 5 and sys.argv[1] == "--run":
        part_runner(sys.argv[2], int(sys.argv[4]))(int(sys.argv[3]))
        sys.exit(0)
    sys.exit(f"usage: extproc bench instructions (this module's --run is internal): {sys.argv[1:]}")

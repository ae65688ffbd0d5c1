"""Child processes of ``extproc up``: started with their logs in files, stopped together, never orphaned."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends it SIGTERM if ``extproc up`` dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_file: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Starts children in order and stops them in reverse order (Envoy before the picker before Triton)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        log_file = self.log_dir / f"{name}.log"
        with log_file.open("ab") as out:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                # Own process group: a terminal's Ctrl-C reaches only us, and we stop children in order.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, process, log_file)
        self.children.append(child)
        return child

    def exited(self) -> list[Child]:
        return [c for c in self.children if c.process.poll() is not None]

    def stop(self, timeout_s: float = 10.0, first: str = "envoy") -> None:
        """Stop the children named ``first`` (Envoy), then all the others at once, killing whatever is left
        after ``timeout_s``. Envoy goes first so its upstream connections close: Triton waits for open HTTP
        connections on SIGTERM. Each child's process group is killed at the end, because Triton's python
        backend stubs are grandchildren in the same group."""
        deadline = time.monotonic() + timeout_s
        leading = [c for c in self.children if c.name == first]
        rest = [c for c in reversed(self.children) if c.name != first]
        for group in (leading, rest):
            for child in group:
                if child.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.process.pid, signal.SIGTERM)
            for child in group:
                try:
                    child.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        for child in self.children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGKILL)

"""Child processes of ``extproc up``: started with their logs in files, stopped together, never orphaned."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    argv: tuple[str, ...]
    env: dict[str, str] | None

    def has_exited(self) -> bool:
        """Whether the process has exited, without reaping it: until :meth:`subprocess.Popen.poll` reaps it,
        its pid (the id of its process group) cannot be reused, and what it left running can still be found."""
        if self.process.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.process.poll() is not None
        return info is not None

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
        child = self._launch(name, tuple(argv), dict(env) if env is not None else None)
        self.children.append(child)
        return child

    def restart(self, child: Child) -> Child:
        """Start an exited child again with the same command line and environment. The new child takes the
        old one's place, and so its place in the order :meth:`stop` stops them in."""
        if child.process.returncode is None:
            raise ValueError(f"{child.name} (pid {child.process.pid}) has not been reaped")
        new = self._launch(child.name, child.argv, child.env)
        self.children[self.children.index(child)] = new
        return new

    def _launch(self, name: str, argv: tuple[str, ...], env: dict[str, str] | None) -> Child:
        log_file = self.log_dir / f"{name}.log"
        with log_file.open("ab") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                # Own process group: a terminal's Ctrl-C reaches only us, and we stop children in order.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return Child(name, process, log_file, argv, env)

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


def describe_exit(returncode: int) -> str:
    """``code 1``, or ``signal SIGKILL`` for a process a signal ended (Popen's negative return codes)."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name, in parentheses, may itself contain ") ".
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def end_group(pgid: int, timeout_s: float = 5.0) -> list[int]:
    """SIGKILL what is left of process group ``pgid`` and wait for it to go; returns the processes still
    there after ``timeout_s`` (stuck in the kernel)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@dataclass
class RestartPolicy:
    """When to start a child that exited again: after ``first_delay_s``, doubling (up to ``max_delay_s``)
    with each exit remembered; exits are remembered for ``window_s``. A child that exits more than
    ``max_exits`` times within ``window_s`` is left down.

    The window is long enough to hold ``max_exits`` backoff delays plus as many slow starts (Triton loading
    its models), so a child that fails at every start is caught, however long it takes to fail."""

    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    max_exits: int = 5
    window_s: float = 300.0
    exits: deque[float] = field(default_factory=deque)

    def on_exit(self, now: float) -> float | None:
        """Record an exit at ``now`` (monotonic seconds); the seconds to wait before restarting, or None to
        leave the child down."""
        self.exits.append(now)
        while self.exits[0] <= now - self.window_s:
            self.exits.popleft()
        if len(self.exits) > self.max_exits:
            return None
        return float(min(self.first_delay_s * 2 ** (len(self.exits) - 1), self.max_delay_s))

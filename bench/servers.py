"""Servers under benchmark: each started as a child of the benchmark in a session of its own, its output
in a log file, its memory sampled while it runs (the whole session: ``bentoml serve`` and its runner
processes, vLLM's API server and engine core), stopped with its process group. When one fails (does not
start, dies, is killed for memory, answers with an error) the benchmark gets a ``ServerFailed`` with
the reason and the last lines of its log, and goes on with the next system."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

MIB = 1 << 20


class ServerFailed(Exception):
    def __init__(self, reason: str, log_tail: list[str] | None = None):
        reason = " ".join(reason.split())  # one line, not an exception's whole tensor
        reason = reason if len(reason) <= 400 else reason[:400] + " ..."
        super().__init__(reason)
        self.reason, self.log_tail = reason, log_tail or []


def _status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict ({} once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def _kib(value: str | None) -> int:
    return int(value.split()[0]) * 1024 if value else 0


def server_pids(root: int) -> list[int]:
    """The server ``root`` and every process it started: its descendants (``bentoml serve``'s workers
    each call setsid) and the rest of its session (a process that left its tree)."""
    parent: dict[int, int] = {}
    session: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        if int(fields[3]) == root:
            session.append(pid)
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root] if root in parent else []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return list(dict.fromkeys(tree + session))


def kill_all(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _pss(pid: int) -> int:
    """Proportional set size: each shared page counted as its share (vLLM's and torch's compile workers
    share most of their resident pages, which a sum of VmRSS counts once per process)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((_kib(line.split(":", 1)[1]) for line in f if line.startswith("Pss:")), 0)
    except OSError:
        return 0


class MemorySampler(threading.Thread):
    """Samples the memory of a server's processes (``server_pids``) every ``interval`` s: ``peak`` is the
    largest sum of VmRSS over them, ``hwm`` the largest VmHWM of one of them (the kernel's own peak, which
    catches what falls between samples), ``pss_peak`` the largest sum of their PSS (read every
    ``pss_every`` samples: it costs more). Past ``limit`` bytes of RSS it kills them (SIGKILL), before
    the kernel's OOM killer picks a process, maybe another's, and says so in ``killed``."""

    def __init__(self, root: int, limit: int | None = None, interval: float = 0.25, pss_every: int = 8):
        super().__init__(daemon=True)
        self.root, self.limit, self.interval, self.pss_every = root, limit, interval, pss_every
        self.pids: list[int] = []
        self.peak = self.hwm = self.current = self.pss_peak = self.pss_current = 0
        self.samples = 0
        self.names: dict[int, str] = {}  # pid -> name, of every process seen
        self.killed: str | None = None
        self._stop = threading.Event()

    def sample(self, pss: bool = False) -> None:
        total = 0
        self.pids = server_pids(self.root) or self.pids
        for pid in self.pids:
            status = _status(pid)
            total += _kib(status.get("VmRSS"))
            self.hwm = max(self.hwm, _kib(status.get("VmHWM")))
            self.names.setdefault(pid, status.get("Name", "?"))
        self.current, self.peak = total, max(self.peak, total)
        if self.limit and total > self.limit and not self.killed:
            self.killed = f"killed by the benchmark: {total / MIB:.0f} MiB resident, over --max-rss-gib"
            kill_all(self.pids, signal.SIGKILL)
        if pss or self.samples % self.pss_every == 0:
            self.pss_current = sum(_pss(pid) for pid in self.pids)
            self.pss_peak = max(self.pss_peak, self.pss_current)
        self.samples += 1

    def run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()

    def gone(self) -> list[str]:
        """The processes seen earlier that have exited since."""
        return [f"{name} (pid {pid})" for pid, name in self.names.items() if not _status(pid)]


def describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else "?"
        return f"exited with {code} ({name}{': OOM?' if code == -signal.SIGKILL else ''})"
    return f"exited with {code}"


class Server:
    """``with Server(...) as server:`` starts ``cmd`` and waits until ``ready_url`` answers 200;
    ``server.failure(exc)`` is the ``ServerFailed`` for an error met while it ran; leaving stops it."""

    def __init__(self, name: str, cmd: list[str], ready_url: str, log: Path, *, env: dict | None = None,
                 cwd: Path | None = None, max_rss: int | None = None, timeout: float = 900):
        self.name, self.cmd, self.ready_url, self.log = name, cmd, ready_url, log
        self.env, self.cwd, self.max_rss, self.timeout = env, cwd, max_rss, timeout
        self.proc: subprocess.Popen | None = None
        self.memory: MemorySampler | None = None
        self.ready_s: float | None = None
        self.rss_ready = self.pss_ready = 0

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        import httpx

        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env={**os.environ, **(self.env or {})}, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.memory = MemorySampler(self.proc.pid, self.max_rss)
        self.memory.start()
        start = time.monotonic()
        while time.monotonic() - start < self.timeout:
            if self.proc.poll() is not None:
                self.stop()
                raise self.failure(None, "during start-up")
            try:
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    self.ready_s = time.monotonic() - start
                    self.memory.sample(pss=True)
                    self.rss_ready, self.pss_ready = self.memory.current, self.memory.pss_current
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerFailed(f"not ready in {self.timeout:.0f} s", self.log_tail())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not (self.memory and self.memory.killed)

    def failure(self, exc: BaseException | None, when: str = "") -> ServerFailed:
        """What went wrong, worded for the report: the server's own end first, else the error."""
        when = f" {when}" if when else ""
        if exc is not None and self.proc is not None:
            try:  # a dropped connection comes a moment before the exit status
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
        if self.memory and self.memory.killed:
            reason = self.memory.killed + when
        elif self.proc is not None and self.proc.poll() is not None:
            reason = describe_exit(self.proc.returncode) + when
        else:
            reason = (f"{type(exc).__name__}: {exc}" if exc is not None else "failed") + when
            gone = self.memory.gone() if self.memory else []
            if gone:
                reason += f"; exited meanwhile: {', '.join(gone[:4])}"
        return ServerFailed(reason, self.log_tail())

    def log_tail(self, lines: int = 12) -> list[str]:
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 16384))
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        if self.memory:  # what is left (a worker of bentoml serve in a session of its own, that outlived it)
            self.memory.stop()
            kill_all([pid for pid in self.memory.pids if pid in self.memory.names and _status(pid).get("Name") ==
                      self.memory.names[pid]], signal.SIGKILL)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def run(self, coro):
        """Run the load ``coro`` while watching the server: if it dies, the load is cancelled at once
        (rather than waiting on its requests' time-outs); any error comes out as ``ServerFailed``."""
        async def watched():
            task = asyncio.ensure_future(coro)
            while not task.done():
                await asyncio.wait([task], timeout=0.5)
                if not task.done() and not self.alive():
                    task.cancel()
                    raise self.failure(None, "during the load")
            return task.result()

        try:
            return asyncio.run(watched())
        except ServerFailed:
            raise
        except Exception as e:  # noqa: BLE001 — any error of the load is this server's failure
            raise self.failure(e, "during the load") from e

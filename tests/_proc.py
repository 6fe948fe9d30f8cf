"""Running helper scripts in real subprocesses, with every wait bounded in time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def script_env(**extra: str) -> dict[str, str]:
    """The environment for a helper process: the repo importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TELEMETRYDECK_DISABLED", None)
    env.update(extra)
    return env


def run_script(name: str, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    """Run ``tests/scripts/<name>`` with ``args`` to its end (bounded), output captured."""
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=script_env(),
        cwd=str(REPO),
        check=False,
    )


class Proc:
    """A child process whose stdout and stderr lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._pumps = [
            asyncio.ensure_future(self._pump(proc.stdout, self.out)),
            asyncio.ensure_future(self._pump(proc.stderr, self.err)),
        ]

    @staticmethod
    async def _pump(stream: asyncio.StreamReader, sink: list[str]) -> None:
        while line := await stream.readline():
            sink.append(line.decode("utf-8", "replace").rstrip("\n"))

    @property
    def output(self) -> str:
        """Everything printed so far, stdout then stderr, for assertion messages."""
        return "--- stdout\n" + "\n".join(self.out) + "\n--- stderr\n" + "\n".join(self.err)

    async def wait_for(self, pattern: str, *, stream: str = "out", timeout: float = 30.0) -> str:
        """The first line (of ``stream``) matching ``pattern``; fails after ``timeout`` s."""
        regex = re.compile(pattern)
        lines = self.out if stream == "out" else self.err
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for line in lines:
                if regex.search(line):
                    return line
            if self.proc.returncode is not None and all(p.done() for p in self._pumps):
                break
            await asyncio.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} in {stream}\n{self.output}")

    def send_signal(self, signum: int) -> None:
        """Deliver ``signum`` to the process."""
        self.proc.send_signal(signum)

    async def finish(self, timeout: float = 60.0) -> int:
        """Wait for the exit (bounded) and the last output; return the exit status."""
        returncode = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(asyncio.gather(*self._pumps), timeout)
        return returncode

    async def kill(self) -> None:
        """Kill the process if it still runs (test teardown)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        for pump in self._pumps:
            pump.cancel()


async def start(*args: str, env: dict[str, str] | None = None, python: bool = True) -> Proc:
    """Start ``python args...`` (or ``args`` as is) with :func:`script_env`."""
    argv = [sys.executable, *args] if python else list(args)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else script_env(),
        cwd=str(REPO),
    )
    return Proc(proc)

"""Servers started the way a user starts them: `vlmtune api|webui ...` in a subprocess on a free port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(args: list[str], ready_url: str, log_path: Path, env: dict | None = None, timeout: float = 120,
            headers: dict | None = None):
    """Run `vlmtune ARGS` until ready_url answers 200; yield the process; stop it afterwards."""
    full_env = dict(os.environ, OMP_NUM_THREADS="2", GRADIO_ANALYTICS_ENABLED="False", **(env or {}))
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "vlmtune", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=full_env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`vlmtune {' '.join(args[:1])}` exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(urllib.request.Request(ready_url, headers=headers or {}), timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{ready_url} did not answer within {timeout} s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

"""Start a real `qwen-engine serve` in a subprocess on a free loopback port, and stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, base_url: str, timeout: float) -> None:
    """Until `GET /health` answers 200; raises (with the server's stderr) if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-4000:]}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start in time")


class ServerProcess:
    def __init__(self, *args: str, api_key: str | None = None, timeout: float = 300):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "qwen_engine.cli", "serve", "--port", str(self.port), *args]
        if api_key:
            command += ["--api-key", api_key]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=os.environ.copy())
        wait_until_healthy(self.proc, self.base_url, timeout)

    def stop(self, sig: int | None = None) -> int:
        import signal

        self.proc.send_signal(sig or signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9

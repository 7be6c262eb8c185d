"""A live ``fdctl serve`` (or ``start-gpu``) subprocess for tests: started on a free port, stopped with SIGTERM.

The server's stderr goes to a file (a pipe left unread would stall it); the
ready line ``serving <model> on <url>`` gives the URL.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FDCTL = str(Path(sys.executable).with_name("fdctl"))
READY = re.compile(r"serving \S+ on (http://\S+)")
TINY_ARGS = ("--model", "random:tiny", "--dtype", "float32", "--device", "cpu", "--seed", "0")


class LiveServer:
    def __init__(self, *args: str, command: str = "serve", env: dict[str, str] | None = None,
                 start_timeout_s: float = 120.0) -> None:
        self.final_log = ""
        self._log = tempfile.NamedTemporaryFile("w+", prefix="fdctl-serve-", suffix=".log", delete=False)
        full_env = {name: value for name, value in os.environ.items() if name != "FASTDECODE_API_KEY"}
        full_env.update({"HF_HUB_OFFLINE": "1", **(env or {})})
        self.process = subprocess.Popen([FDCTL, command, "--port", "0", *args], stdout=subprocess.DEVNULL,
                                        stderr=self._log, env=full_env)
        self.url = self._wait_ready(start_timeout_s)
        self.ws_url = self.url.replace("http://", "ws://", 1) + "/v1/stream"

    def log(self) -> str:
        """The server's stderr so far (after ``stop``: all of it)."""
        if self._log.closed:
            return self.final_log
        return Path(self._log.name).read_text(errors="replace")

    def _wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = READY.search(self.log())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise RuntimeError(f"fdctl serve exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fdctl serve was not ready in {timeout_s} s:\n{self.log()}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit code (kills it if it does not stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self._log.closed:
            self.final_log = self.log()
            self._log.close()
            os.unlink(self._log.name)
        return self.process.returncode

    def __enter__(self) -> "LiveServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""A bundle's own `python -m llama_cpp.server` line, run on a free local port for a test."""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def served_bundle(bundle: Path, timeout: float = 120) -> Iterator[Callable[[str, dict], dict]]:
    """Start the server line of ``bundle/run.sh`` (this Python, a free port, cwd = the bundle),
    wait until it answers, yield ``post(path, body) -> reply``; stop it afterwards."""
    line = next(t for t in (bundle / "run.sh").read_text().splitlines() if "llama_cpp.server" in t).removeprefix("# ")
    args = shlex.split(line)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args[0], args[args.index("--port") + 1] = sys.executable, str(port)
    base = f"http://127.0.0.1:{port}"

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    # the server's log goes to a file: llama.cpp logs a large model's load at length, and a pipe
    # nobody reads while waiting would fill and stall it
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(args, cwd=bundle, stdout=subprocess.DEVNULL, stderr=log)

    def tail() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")[-2000:]

    try:
        deadline = time.monotonic() + timeout
        while True:
            assert server.poll() is None, tail()
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"the server did not come up: {tail()}"
                time.sleep(0.25)
        yield post
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

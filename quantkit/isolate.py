"""A process boundary around native code that can abort.

llama.cpp ends the process on some bad inputs (``GGML_ASSERT`` in the vocabulary loader, for
one), and so can ONNX Runtime; an abort cannot be caught in Python. Such calls run here, in a
child ``python -m quantkit.isolate MODULE:FUNCTION``: the function's arguments go in as JSON on
stdin, its result comes back as JSON, progress lines stream back while it runs, and a crash
becomes an ordinary :class:`NativeError` (exit code 1) whose message is the native library's
own line, taken from the child's stderr. The parent's cleanup (``atomic_dir``) runs as usual.

Protocol on the child's stdout (its real stdout; the native libraries' prints are sent to
stderr): ``@quantkit progress N``, ``@quantkit result JSON``, ``@quantkit error CLASS JSON``.
The child dies with its parent (``PR_SET_PDEATHSIG``), so a killed run leaves no worker behind.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from . import errors
from .errors import NativeError, QuantkitError

__all__ = ["run_isolated", "native_message", "Reporter", "in_child"]

_PREFIX = "@quantkit "
_CHILD_ENV = "QUANTKIT_ISOLATED"  # set in the child (and so seen by both copies of this module there)
# lines that carry the native library's own reason, best first
_REASONS = (
    re.compile(r"GGML_ASSERT|GGML_ABORT|Assertion .* failed"),
    re.compile(r"terminate called|what\(\):"),
    re.compile(r"\berror\b|\bfailed\b|exception", re.IGNORECASE),
)
# backtrace and debugger noise that follows an abort
_NOISE = re.compile(r"^(#\d+|\[New LWP|\[Thread |0x[0-9a-f]+|/lib|Aborted|Using host libthread_db|warning: process)")


def native_message(stderr: str, limit: int = 300) -> str:
    """The line of a native library's stderr that says why it failed (path prefix removed)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not _NOISE.match(ln.strip())]
    for pattern in _REASONS:
        hits = [ln for ln in lines if pattern.search(ln)]
        if hits:
            line = hits[0] if pattern is _REASONS[0] else hits[-1]
            break
    else:
        line = lines[-1] if lines else ""
    line = re.sub(r"^\S*/([^/\s]+:\d+:)", r"\1", line)  # /long/build/path/llama-vocab.cpp:123: -> llama-vocab.cpp:123:
    return line[:limit]


def in_child() -> bool:
    """True inside an isolated child: native code here is already behind a process boundary."""
    return os.environ.get(_CHILD_ENV) == "1"


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-returncode).name
        return f"signal {-returncode}"
    return f"exit status {returncode}"


def run_isolated(
    target: str,
    args: dict[str, Any],
    *,
    what: str,
    on_progress: Callable[[int], None] | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> Any:
    """Run ``target`` ("quantkit.module:function", called as ``function(args, reporter)``) in a
    child process and return its JSON result.

    A QuantkitError raised in the child is raised here with the same class and message; a crash
    or any other failure raises NativeError("WHAT failed: <native message> (SIGABRT)")."""
    if not target.startswith("quantkit."):
        raise ValueError(f"not a quantkit function: {target}")
    if in_child():  # a child never spawns another: that would recurse
        raise RuntimeError(f"run_isolated({target}) called inside an isolated child")
    # the child imports this very quantkit, whatever its working directory; a fixed hash seed, so
    # what a library writes in the order of a set of names is the same in every run
    child_env = {**os.environ, **(env or {}), "GGML_NO_BACKTRACE": "1", _CHILD_ENV: "1", "PYTHONHASHSEED": "0",
                 "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with tempfile.TemporaryFile(mode="w+b") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "quantkit.isolate", target],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=child_env,
        )
        result, failure = None, None
        expired: list[bool] = []
        def expire() -> None:
            if proc.poll() is None:  # still running: a child that already finished is no timeout
                expired.append(True)
                proc.kill()

        timer = threading.Timer(timeout, expire) if timeout else None
        if timer:
            timer.start()
        try:
            assert proc.stdin is not None and proc.stdout is not None
            with contextlib.suppress(BrokenPipeError):  # a child that died at start: its stderr says why
                proc.stdin.write(json.dumps(args).encode())
                proc.stdin.close()
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if not line.startswith(_PREFIX):
                    continue
                kind, _, payload = line[len(_PREFIX):].partition(" ")
                if kind == "progress" and on_progress:
                    on_progress(int(payload))
                elif kind == "result":
                    result = json.loads(payload)
                elif kind == "error":
                    name, _, message = payload.partition(" ")
                    failure = (name, json.loads(message))
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    if failure is not None:
        name, message = failure
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, QuantkitError):
            raise cls(message)
        raise NativeError(f"{what} failed: {message}")
    if expired:
        raise NativeError(f"{what} failed: no result after {timeout:.0f} s")
    if proc.returncode != 0 and result is None:
        reason = native_message(stderr) or "no message"
        raise NativeError(f"{what} failed: {reason} ({_signal_name(proc.returncode)})")
    if result is None:
        raise NativeError(f"{what} failed: the worker ended without a result ({native_message(stderr) or 'no message'})")
    return result


class Reporter:
    """What a function running in the child uses to talk to the parent."""

    def __init__(self, channel) -> None:
        self._channel = channel

    def progress(self, n: int = 1) -> None:
        self._send(f"progress {int(n)}")

    def _send(self, line: str) -> None:
        self._channel.write(_PREFIX + line + "\n")
        self._channel.flush()


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _child(target: str) -> None:
    _die_with_parent()
    # the protocol gets the real stdout; anything native code prints goes to stderr
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    reporter = Reporter(channel)
    module_name, _, func_name = target.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(json.loads(sys.stdin.read() or "{}"), reporter)
    except QuantkitError as exc:
        reporter._send(f"error {type(exc).__name__} {json.dumps(str(exc))}")
        sys.exit(3)
    except Exception as exc:  # reported to the parent as a failure of the native step
        reporter._send(f"error {type(exc).__name__} {json.dumps(f'{type(exc).__name__}: {exc}')}")
        sys.exit(3)
    reporter._send(f"result {json.dumps(result)}")
    channel.close()


def _abort_for_tests(args: dict, reporter) -> None:
    """Print a message and abort, as a native assertion does (used by the tests)."""
    sys.stderr.write(f"native.cpp:1: GGML_ASSERT({args['message']}) failed\n")
    sys.stderr.flush()
    os.abort()


if __name__ == "__main__":
    _child(sys.argv[1])

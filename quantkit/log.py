"""quantkit's log: the libraries' chatter goes here, not to the user's terminal.

llama.cpp's log callback, transformers' and huggingface_hub's progress bars and warnings, and
Python warnings are routed into the ``quantkit`` logger tree. The CLI shows quantkit's own
warnings (``warning: ...``) and, with ``--debug``, everything; a program using the Python API
configures ``logging`` as it likes (nothing below WARNING reaches Python's last-resort handler).
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["logger", "configure_cli", "route_llama_cpp", "on_llama_log"]

logger = logging.getLogger("quantkit")
_LLAMA = logging.getLogger("quantkit.llama_cpp")
_llama_callbacks: list = []  # ctypes callbacks handed to llama.cpp must outlive every call into it


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "quantkit" and record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {record.getMessage()}"
        return f"debug[{record.name}]: {record.getMessage().rstrip()}"


def configure_cli(debug: bool) -> None:
    """Called once by the CLI before any library is imported: quiet libraries, one handler."""
    if not debug:
        # read by huggingface_hub and by transformers (whose tqdm follows the hub's switch) at import
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        # libraries already imported (a program that calls the CLI in-process) are switched directly
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        if "transformers" in sys.modules:
            tf_logging = sys.modules["transformers"].utils.logging
            tf_logging.set_verbosity_error()
            tf_logging.disable_progress_bar()
    logging.captureWarnings(True)  # warnings.warn(...) from libraries -> the "py.warnings" logger
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliFormatter())
    handler.setLevel(logging.DEBUG if debug else logging.WARNING)
    for name in ("quantkit", "py.warnings"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(logging.DEBUG if debug else logging.WARNING)
        log.propagate = False
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if debug else logging.CRITICAL)


def on_llama_log(handle) -> None:
    """Give every line llama.cpp logs from now on to ``handle(text)``; the callback stays
    referenced for the life of the process (llama.cpp may log until exit)."""
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if text:
            handle(text.decode("utf-8", "replace"))

    _llama_callbacks.append(callback)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def route_llama_cpp() -> None:
    """Send llama.cpp's log (load notices, 'using full-size SWA cache', ...) to the debug log."""
    if not _llama_callbacks:
        on_llama_log(lambda text: _LLAMA.isEnabledFor(logging.DEBUG) and _LLAMA.debug(text.rstrip("\n")))

"""The few exception types users see. Each carries a one-line message and an exit code.

Exit codes follow the CLI convention: 2 for bad input (the user can fix it), 1 for a failure
inside quantkit or a runtime (verification failed, a runtime crashed).
"""

from __future__ import annotations

__all__ = [
    "QuantkitError",
    "InputError",
    "SourceError",
    "PickleRefusedError",
    "UnsupportedArchitectureError",
    "TokenizerError",
    "RecipeError",
    "ConversionError",
    "VerificationError",
    "NativeError",
    "ArtifactError",
]


class QuantkitError(Exception):
    """Base class: a one-line message meant for the user."""

    exit_code = 1


class InputError(QuantkitError):
    """Something the user gave us is wrong or unusable."""

    exit_code = 2


class SourceError(InputError):
    """The source model is missing, unreadable, corrupt or truncated."""


class PickleRefusedError(SourceError):
    """The source only has pickle weights and --allow-pickle was not given."""


class UnsupportedArchitectureError(InputError):
    """The model architecture has no entry in quantkit's tables."""


class TokenizerError(InputError):
    """The tokenizer is missing or cannot be represented in the output format."""


class RecipeError(InputError):
    """A recipe string such as 'gguf:q4_k_m' could not be parsed."""


class ConversionError(QuantkitError):
    """Writing or quantizing an artifact failed."""


class VerificationError(QuantkitError):
    """An artifact failed its built-in verification against the source model."""


class NativeError(QuantkitError):
    """A native library (llama.cpp, ONNX Runtime) failed or aborted in quantkit's child process;
    the message carries the library's own line."""


class ArtifactError(InputError):
    """An artifact folder or profile report is damaged: missing or extra files, a manifest
    without its keys, a sha256 that does not match, truncated weights."""

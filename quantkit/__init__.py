"""quantkit: convert open-weight LLMs to GGUF, GPTQ and ONNX, profile them, gate releases."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("quantkit")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__", "convert"]


def __getattr__(name: str):
    if name == "convert":  # keep `import quantkit` light: the API pulls in torch lazily
        from .api import convert

        return convert
    raise AttributeError(name)

"""TurningPoint-GRPO: step-level credit assignment for GRPO fine-tuning of flow-matching models."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One source of truth: pyproject.toml's version, as installed.
    __version__ = version("tpgrpo")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

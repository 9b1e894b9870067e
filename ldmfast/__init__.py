"""ldmfast: fast lesion-aware latent diffusion for CT perfusion to diffusion MRI synthesis."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("ldmfast")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from . import nn, ops  # noqa: E402

__all__ = ["__version__", "nn", "ops"]

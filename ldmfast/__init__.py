"""ldmfast: fast lesion-aware latent diffusion for CT perfusion to diffusion MRI synthesis."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("ldmfast")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from . import nn, ops  # noqa: E402

__all__ = ["__version__", "accelerate", "nn", "ops", "restore"]

# Imported on first use: `import ldmfast` stays light and works without MONAI or diffusers.
_LAZY = {"accelerate": ("acceleration", "accelerate"), "restore": ("acceleration", "restore"),
         "schedulers": ("schedulers", None)}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'ldmfast' has no attribute {name!r}")
    from importlib import import_module
    module_name, attribute = _LAZY[name]
    module = import_module(f".{module_name}", __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip this function
    return value

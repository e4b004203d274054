"""Optional dependencies: which extra provides each, and one error that says how to install it."""
from __future__ import annotations

import importlib

# module -> the pip command that installs it (the package extra where one exists)
INSTALL = {"diffusers": 'pip install "sage3-diffusers[diffusers]"',
           "matplotlib": 'pip install matplotlib (or "sage3-diffusers[bench]")',
           "imageio_ffmpeg": 'pip install "sage3-diffusers[video]"'}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pip command that installs it."""


def install_hint(module: str) -> str:
    return INSTALL.get(module, f"pip install {module}")


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def headless_pyplot(what: str | None = None):
    """matplotlib.pyplot on the non-interactive Agg backend (plots are files, never windows). Without matplotlib:
    None, or MissingExtraError when `what` (the command that needs the plot) is given."""
    if what is not None:
        matplotlib = require("matplotlib", what)
    else:
        try:
            import matplotlib
        except ImportError:
            return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def require(module: str, what: str):
    """Import and return `module`, or raise MissingExtraError saying that `what` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{what} needs {module}, which is not installed ({e}); install it with: "
                                f"{install_hint(module)}") from None

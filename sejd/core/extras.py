"""Optional extras: import a package that only some commands need, or say in one line which extra installs it."""

from __future__ import annotations

import importlib

from sejd.core.errors import SejdError

EXTRAS = {  # top-level module -> the extra of pyproject.toml that installs it
    "onnxruntime": "cpu",  # or 'gpu' on a CUDA machine: never both
    "matplotlib": "report",
    "sklearn": "train",
    "skimage": "train",
    "ray": "serve",
    "fastapi": "serve",
    "prometheus_client": "serve",
    "tritonclient": "triton",
    "tensorrt": "tensorrt",
    "transformers": "text",  # T5 text encoder for STARFlow prompts
    "sentencepiece": "text",
    "diffusers": "vae",  # the SD VAE that turns STARFlow latents into images
}


class MissingExtra(SejdError):
    """A command needs a package from an optional extra that is not installed."""


def require(module: str, what: str):
    """Import `module` (e.g. "matplotlib.pyplot") for `what` (e.g. "sejd bench --plot"), or raise
    MissingExtra naming the extra to install."""
    top = module.split(".")[0]
    try:
        importlib.import_module(top)  # first: a cached submodule must not hide a missing package
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(top)
        hint = f"pip install 'sejd[{extra}]'" if extra else f"pip install {top}"
        if top == "onnxruntime":
            hint += " (or 'sejd[gpu]' on a CUDA machine, never both)"
        raise MissingExtra(f"{what} needs {top}, which is not installed ({e}); {hint}") from None

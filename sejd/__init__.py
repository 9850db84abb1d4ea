"""sejd: fast, verified sampling of TarFlow normalizing flows (Selective Jacobi Decoding on real engines)."""

from sejd.errors import CheckpointError, ConfigError, DecodeError, InputError, PlanError, SejdError
from sejd.model.checkpoint import load_checkpoint, save_checkpoint
from sejd.model.tarflow import TarFlow, TarFlowConfig
from sejd.runtime.plan import Plan
from sejd.runtime.sampler import sample


def _version() -> str:
    """The one version string: the installed package's metadata (pyproject.toml's `version`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sejd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


__version__ = _version()
__all__ = ["CheckpointError", "ConfigError", "DecodeError", "InputError", "Plan", "PlanError", "SejdError",
           "TarFlow", "TarFlowConfig", "load_checkpoint", "sample", "save_checkpoint"]

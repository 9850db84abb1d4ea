"""sejd: fast, verified sampling of TarFlow normalizing flows (Selective Jacobi Decoding on real engines)."""

from sejd.core.errors import (
           CheckpointError,
           ConfigError,
           DecodeError,
           InputError,
           PlanError,
           SejdError,
)
from sejd.core.version import VERSION
from sejd.model.checkpoint import load_checkpoint, save_checkpoint
from sejd.model.tarflow import TarFlow, TarFlowConfig
from sejd.runtime.plan import Plan
from sejd.runtime.sampler import sample

__version__ = VERSION
__all__ = ["CheckpointError", "ConfigError", "DecodeError", "InputError", "Plan", "PlanError", "SejdError",
           "TarFlow", "TarFlowConfig", "load_checkpoint", "sample", "save_checkpoint"]

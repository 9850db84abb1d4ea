"""Every error sejd raises for bad input derives from `SejdError`.

Messages name what was expected and what came, so a user never has to read a traceback
from deep inside torch to find out what went wrong.
"""


class SejdError(Exception):
    """Base class of all user-facing sejd errors."""


class CheckpointError(SejdError):
    """A checkpoint file could not be read, or its tensors do not match the model."""


class ConfigError(SejdError):
    """A model configuration is invalid or contradicts the weights."""


class InputError(SejdError):
    """Bad input to a sampler or model: wrong shape, dtype, label range, or non-finite values."""


class PlanError(SejdError):
    """A decoding plan names an unknown decoder or block, or has invalid parameters."""


class DecodeError(SejdError):
    """Decoding failed part-way, e.g. non-finite values appeared."""


class BackendUnavailable(SejdError):
    """The requested backend is not installed or has no device here."""

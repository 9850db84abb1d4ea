"""The one version string: the installed package's metadata (pyproject.toml's `version`)."""

from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    try:
        return version("sejd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


VERSION = _version()

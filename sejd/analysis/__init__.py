"""The pieces of `sejd analyze` (see `sejd.analyze` for the definitions they measure)."""

"""The pieces of `sejd analyze` (see `sejd.workflows.analyze` for the definitions they measure)."""

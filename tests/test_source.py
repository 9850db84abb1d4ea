"""sejd.workflows.source: `Session` (an opened model and its backend)."""

from sejd.workflows.source import Session, open_source


def test_open_source_opens_a_session(tiny_bundle):
    session = open_source(tiny_bundle.path, "torch")
    assert isinstance(session, Session) and session.backend == "torch" and session.bundle.path == tiny_bundle.path

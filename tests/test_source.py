"""sejd.source: `Session` (an opened model and its backend), and its deprecated former name."""

import pytest

from sejd.source import Session, open_source


def test_the_former_name_source_still_works_for_one_release_and_warns():
    with pytest.warns(DeprecationWarning, match="Source is now sejd.source.Session"):
        from sejd.source import Source
    assert Source is Session
    with pytest.raises(ImportError, match="cannot import name 'Sauce'"):
        from sejd.source import Sauce  # noqa: F401


def test_open_source_opens_a_session(tiny_bundle):
    session = open_source(tiny_bundle.path, "torch")
    assert isinstance(session, Session) and session.backend == "torch" and session.bundle.path == tiny_bundle.path

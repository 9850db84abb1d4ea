"""sejd.core.files.read_regular: only regular files are read; anything else is one error line, no hang."""

import os

import pytest

from sejd.core.errors import InputError
from sejd.core.files import read_regular


def test_a_directory_is_refused_by_name_and_its_descriptor_closed(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(InputError, match="the input is a directory; expected a regular file"):
        read_regular(tmp_path, "the input", 100, InputError)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        read_regular(fifo, "the input", 100, InputError)


def test_a_regular_file_over_the_limit_is_refused_and_one_within_is_read(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 11)
    with pytest.raises(InputError, match="11 bytes, more than the 10"):
        read_regular(f, "the input", 10, InputError)
    assert read_regular(f, "the input", 11, InputError) == b"x" * 11

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


def test_an_atomic_write_gets_the_umask_even_when_the_writer_replaces_the_file(tmp_path):
    """safetensors 0.8 writes to its own 0600 file and renames it over the given path: a checkpoint or bundle
    model that only its owner can read would break a service running as another user."""
    import torch
    from safetensors.torch import save_file

    from sejd.core.files import atomic_write

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "m.safetensors") as tmp:
            save_file({"x": torch.zeros(3)}, tmp)
        with atomic_write(tmp_path / "t.txt") as tmp:
            open(tmp, "w").write("x")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "m.safetensors").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(tmp_path / "t.txt").st_mode & 0o777) == oct(0o644)

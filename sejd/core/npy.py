"""The header of a `.npy` array, read before numpy makes the array: what callers check (dtype, shape, the data's
size) comes from here, so a forged header never makes numpy allocate what it claims or unpickle anything."""

from __future__ import annotations

import io

import numpy as np

NPY_MAGIC = b"\x93NUMPY"


def npy_header(data: bytes) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran order, dtype, offset of the data) of the `.npy` bytes `data`; ValueError, with numpy's
    reason, when the header is not one numpy writes (format 1.0 or 2.0)."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f"NPY format version {version[0]}.{version[1]}, not 1.0 or 2.0")
    shape, fortran, dtype = read_header(stream)
    return tuple(shape), fortran, dtype, stream.tell()

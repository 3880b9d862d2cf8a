"""Receive-region layout and payload packing for the Mooncake EP exchange.

Every rank registers one receive region of the same layout. A sender knows the offset of its slot in
every peer's region from the layout alone (source-major, fixed capacity per source), so an exchange
needs no negotiation. Region layout, all offsets from the region base, every block 64-byte aligned:

    signals  [num_ranks, buffers_per_source] x 64 B   one uint64 sequence number per line
    probes   [num_ranks] x 64 B                        written by set_peers to open a connection
    slots    [num_ranks, buffers_per_source] x slot_bytes
             slot = payload header (HEADER_BYTES) + arrays, each at a 64-byte aligned offset

A payload is up to MAX_ARRAYS numpy arrays of at most MAX_NDIM dimensions; its data capacity is
`meta_bytes + max_rows * row_bytes` plus alignment slack, so `[max_rows, row]` rows and metadata
arrays of `meta_bytes` in total always fit. Exchange seq `s` uses buffer `s % buffers_per_source`.

Payload header (uint64 words): magic, seq, n_arrays, used_bytes, 4 reserved, then per array 8 words:
dtype code, ndim, offset (from the slot start), nbytes, shape[0..3].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "ALIGN", "EPOCH_SHIFT", "HEADER_BYTES", "MAX_ARRAYS", "MAX_NDIM", "PayloadError", "RegionLayout", "check_seq",
    "aligned_buffer", "pack_payload", "unpack_payload", "with_epoch",
]

ALIGN = 64
MAX_ARRAYS = 8
MAX_NDIM = 4
_HEADER_WORDS = 8
_ARRAY_WORDS = 8
HEADER_BYTES = 8 * (_HEADER_WORDS + MAX_ARRAYS * _ARRAY_WORDS)  # 576
_MAGIC = 0x4A454D5F50415931  # "JEM_PAY1"
_MAX_SEQ = 2**63 - 1
# A seq written by an exchange is (epoch << EPOCH_SHIFT) | the step's own number (csrc/cpu/
# exchange_state.h kEpochShift): every header and signal carries its epoch, and a receiver accepts
# only its own epoch's, so a rank fenced out of an epoch cannot be counted in a later one.
EPOCH_SHIFT = 40


def with_epoch(seq: int, epoch: int) -> int:
    """`seq` (in [1, 2**40)) tagged with `epoch`."""
    if not 1 <= int(seq) < 1 << EPOCH_SHIFT:
        raise ValueError(f"seq must be in [1, 2**{EPOCH_SHIFT}) to carry an epoch, got {seq}")
    if not 0 <= int(epoch) < 1 << (63 - EPOCH_SHIFT):
        raise ValueError(f"epoch must be in [0, 2**{63 - EPOCH_SHIFT}), got {epoch}")
    return (int(epoch) << EPOCH_SHIFT) | int(seq)


def _dtype_table() -> list[np.dtype]:
    names = ["float32", "float16", "uint16", "int32", "uint32", "int64", "uint64", "uint8",
             "int8", "int16", "float64", "bool"]
    table = [np.dtype(n) for n in names]
    try:  # bfloat16 ships with jax (ml_dtypes); raw uint16 works without it
        import ml_dtypes
        table.append(np.dtype(ml_dtypes.bfloat16))
    except ImportError:  # pragma: no cover - ml_dtypes is a jax dependency
        pass
    return table


_DTYPES = _dtype_table()
_DTYPE_CODE = {dt: code for code, dt in enumerate(_DTYPES, start=1)}


class PayloadError(ValueError):
    """A payload that cannot be packed (too big, bad dtype/rank) or a received slot that is corrupt."""


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def check_seq(seq) -> int:
    """Exchange sequence numbers are ints in [1, 2**63): 0 marks a never-written signal."""
    if isinstance(seq, (bool, np.bool_)) or not isinstance(seq, (int, np.integer)):
        raise TypeError(f"seq must be an int, got {type(seq).__name__}")
    if not 1 <= int(seq) <= _MAX_SEQ:
        raise ValueError(f"seq must be in [1, 2**63), got {seq}")
    return int(seq)


@dataclass(frozen=True)
class RegionLayout:
    """Geometry of one rank's receive region; identical on every rank of a job.

    Args:
      num_ranks: number of ranks (sources); rank ids are 0..num_ranks-1.
      max_rows: rows a source may send to one destination in one exchange.
      row_bytes: bytes per row (H * itemsize).
      meta_bytes: bytes for the small metadata arrays of one payload (ids, weights, counts).
      buffers_per_source: slots per source; seq s uses slot s % buffers_per_source, so a payload
        received for seq s is not overwritten by that source's seq s+1.
    """

    num_ranks: int
    max_rows: int
    row_bytes: int
    meta_bytes: int
    buffers_per_source: int = 2

    def __post_init__(self):
        for name in ("num_ranks", "max_rows", "row_bytes", "buffers_per_source"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"RegionLayout.{name} must be a positive int, got {value!r}")
        if not isinstance(self.meta_bytes, (int, np.integer)) or self.meta_bytes < 0:
            raise ValueError(f"RegionLayout.meta_bytes must be an int >= 0, got {self.meta_bytes!r}")

    @property
    def data_capacity(self) -> int:
        """Bytes of array data one payload may carry (alignment slack included)."""
        return self.meta_bytes + self.max_rows * self.row_bytes + MAX_ARRAYS * ALIGN

    @property
    def slot_bytes(self) -> int:
        return _round_up(HEADER_BYTES + self.data_capacity, ALIGN)

    @property
    def signals_offset(self) -> int:
        return 0

    @property
    def probes_offset(self) -> int:
        return self.num_ranks * self.buffers_per_source * ALIGN

    @property
    def slots_offset(self) -> int:
        return self.probes_offset + self.num_ranks * ALIGN

    @property
    def region_bytes(self) -> int:
        return self.slots_offset + self.num_ranks * self.buffers_per_source * self.slot_bytes

    def buffer_index(self, seq: int) -> int:
        return check_seq(seq) % self.buffers_per_source

    def _check_source(self, source: int) -> int:
        if not 0 <= source < self.num_ranks:
            raise ValueError(f"source rank {source} out of range [0, {self.num_ranks})")
        return source

    def signal_offset(self, source: int, seq: int) -> int:
        """Offset of the uint64 signal word that `source` writes for exchange `seq`."""
        self._check_source(source)
        return self.signals_offset + (source * self.buffers_per_source + self.buffer_index(seq)) * ALIGN

    def probe_offset(self, source: int) -> int:
        return self.probes_offset + self._check_source(source) * ALIGN

    def slot_offset(self, source: int, seq: int) -> int:
        """Offset of the payload slot that `source` writes for exchange `seq`."""
        self._check_source(source)
        index = source * self.buffers_per_source + self.buffer_index(seq)
        return self.slots_offset + index * self.slot_bytes

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.num_ranks, self.max_rows, self.row_bytes, self.meta_bytes, self.buffers_per_source)


def aligned_buffer(nbytes: int, align: int = 4096) -> np.ndarray:
    """Zeroed uint8 array of `nbytes` whose data pointer is `align`-aligned (page-aligned memory
    registers cleanly with RDMA NICs). The returned view keeps its base allocation alive."""
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


def _as_payload_array(i: int, array) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise PayloadError(f"payload item {i} must be a numpy array, got {type(array).__name__}")
    if array.dtype not in _DTYPE_CODE:
        raise PayloadError(
            f"payload item {i} has dtype {array.dtype}; supported: {', '.join(map(str, _DTYPES))}")
    if array.ndim > MAX_NDIM:
        raise PayloadError(f"payload item {i} has {array.ndim} dims; at most {MAX_NDIM} supported")
    return array


def pack_payload(slot: np.ndarray, layout: RegionLayout, seq: int, arrays: Sequence[np.ndarray]) -> int:
    """Write header and `arrays` into `slot` (uint8, >= layout.slot_bytes); return the bytes used.

    The bytes [0, used) are what a sender writes to the destination's slot in one transfer.
    """
    seq = check_seq(seq)
    if isinstance(arrays, np.ndarray):
        raise PayloadError("payload must be a sequence of numpy arrays, not a single array")
    arrays = [_as_payload_array(i, a) for i, a in enumerate(arrays)]
    if len(arrays) > MAX_ARRAYS:
        raise PayloadError(f"payload has {len(arrays)} arrays; at most {MAX_ARRAYS} supported")
    offset = HEADER_BYTES
    placed = []
    for array in arrays:
        placed.append(offset)
        offset = _round_up(offset + array.nbytes, ALIGN)
    limit = layout.slot_bytes
    if offset > limit:
        data = sum(a.nbytes for a in arrays)
        raise PayloadError(
            f"payload of {data} bytes in {len(arrays)} arrays exceeds the slot capacity "
            f"({layout.data_capacity} bytes: max_rows={layout.max_rows} x row_bytes={layout.row_bytes}"
            f" + meta_bytes={layout.meta_bytes} + alignment)")
    header = np.zeros(_HEADER_WORDS + MAX_ARRAYS * _ARRAY_WORDS, dtype=np.uint64)
    header[0:4] = (_MAGIC, seq, len(arrays), offset)
    for i, (array, start) in enumerate(zip(arrays, placed)):
        words = header[_HEADER_WORDS + i * _ARRAY_WORDS:_HEADER_WORDS + (i + 1) * _ARRAY_WORDS]
        words[0:4] = (_DTYPE_CODE[array.dtype], array.ndim, start, array.nbytes)
        words[4:4 + array.ndim] = array.shape
        dest = slot[start:start + array.nbytes]
        dest.view(array.dtype).reshape(array.shape)[...] = array
    slot[:HEADER_BYTES].view(np.uint64)[:] = header
    return offset


def unpack_payload(slot: np.ndarray, layout: RegionLayout, seq: int, copy: bool = False) -> list[np.ndarray]:
    """Arrays of the payload in `slot` for exchange `seq`: views into `slot` unless `copy`.

    Raises PayloadError when the header is not a valid payload for `seq` (torn or stale data).
    """
    header = slot[:HEADER_BYTES].view(np.uint64)
    magic, got_seq, n_arrays, used = (int(w) for w in header[:4])
    if magic != _MAGIC:
        raise PayloadError(f"slot header has bad magic {magic:#x}")
    if got_seq != seq:
        raise PayloadError(f"slot header carries seq {got_seq}, expected {seq}")
    if n_arrays > MAX_ARRAYS or not HEADER_BYTES <= used <= layout.slot_bytes:
        raise PayloadError(f"slot header is corrupt (n_arrays={n_arrays}, used={used})")
    out = []
    for i in range(n_arrays):
        words = header[_HEADER_WORDS + i * _ARRAY_WORDS:_HEADER_WORDS + (i + 1) * _ARRAY_WORDS]
        code, ndim, start, nbytes = (int(w) for w in words[:4])
        if not 1 <= code <= len(_DTYPES) or ndim > MAX_NDIM or start < HEADER_BYTES or start + nbytes > used:
            raise PayloadError(f"slot header entry {i} is corrupt (dtype code {code}, ndim {ndim})")
        dtype = _DTYPES[code - 1]
        shape = tuple(int(d) for d in words[4:4 + ndim])
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != nbytes:
            raise PayloadError(f"slot header entry {i}: shape {shape} does not match {nbytes} bytes")
        array = slot[start:start + nbytes].view(dtype).reshape(shape)
        out.append(array.copy() if copy else array)
    return out

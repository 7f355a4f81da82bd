"""Megatron-LM's mmap indexed dataset (`<prefix>.bin` tokens + `<prefix>.idx` index), byte-compatible.

.idx layout, all little-endian:
    magic b"MMIDIDX\\x00\\x00" | version u64 = 1 | dtype code u8 | sequence count u64 (S) | document count u64 (D)
    | lengths i32[S] | byte pointers into .bin i64[S] | document indices i64[D] | (multimodal only) modes i8[S]
Document indices start at 0 and end at S: document d is sequences [doc[d], doc[d+1]).
Nothing in the header says whether the modes section is present (Megatron is told by its caller), so the reader
infers it from the file size: exactly S trailing bytes. Our builder writes the plain text-only layout.
"""

from __future__ import annotations

import array
import hashlib
import os
import struct
from typing import Optional

import numpy as np

from megaeff.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
HEADER_SIZE = _HEADER.size  # 34; the arrays after it are unaligned, which numpy handles

# Megatron's numbering (uint16 is 8, after the floats); the format has no uint32, hence int32 for big vocabularies.
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}

# Validation scans the index in chunks so opening a corpus of 1e8+ sequences needs no O(S) temporaries.
_CHUNK = 1 << 22
_COPY_CHUNK = 1 << 24


def _canonical(dtype) -> np.dtype:
    # The format is little-endian whatever the host or the caller's dtype says.
    return np.dtype(dtype).newbyteorder("<")


def dtype_code(dtype) -> int:
    want = _canonical(dtype)
    for code, known in DTYPE_CODES.items():
        if _canonical(known) == want:
            return code
    names = ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())
    raise ValueError(f"dtype {np.dtype(dtype).name} has no code in the indexed format (supported: {names})")


def optimal_dtype(vocab_size: int) -> np.dtype:
    # Megatron's threshold, kept even though 65535 would fit: files then match what Megatron's tools choose.
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_file_path(prefix: str) -> str:
    return str(prefix) + ".bin"


def index_file_path(prefix: str) -> str:
    return str(prefix) + ".idx"


def _first_true(n: int, bad) -> int | None:
    """The first i < n where the chunk mask `bad(start, stop)` is True, or None."""
    for start in range(0, n, _CHUNK):
        hits = np.flatnonzero(bad(start, min(start + _CHUNK, n)))
        if hits.size:
            return start + int(hits[0])
    return None


def _checked_cast(tokens, dtype: np.dtype) -> np.ndarray:
    """`tokens` as a contiguous 1-D array of `dtype`; a value the dtype cannot hold is an error, never a wrap-around."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"a sequence must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"tokens must be numbers that fit {dtype.name}, got array of {arr.dtype}")
    if np.can_cast(arr.dtype, dtype, "safe"):
        return np.ascontiguousarray(arr, dtype=dtype)  # every value fits: skip the range scan
    if dtype.kind in "iu":
        if arr.dtype.kind == "f" and not np.array_equal(arr, np.trunc(arr)):
            raise ValueError(f"non-integer token values cannot be stored as {dtype.name}")
        info = np.iinfo(dtype)
        lo, hi = info.min, info.max
    else:
        info = np.finfo(dtype)
        lo, hi = float(info.min), float(info.max)
    if arr.min() < lo or arr.max() > hi:  # two reductions; the position is only looked up on failure
        i = int(np.flatnonzero((arr < lo) | (arr > hi))[0])
        raise ValueError(f"token {arr[i]} at position {i} is out of range for {dtype.name} [{lo}, {hi}]")
    return np.ascontiguousarray(arr, dtype=dtype)


class IndexedDatasetBuilder:
    """Streams tokens to the .bin as they come; only the per-sequence lengths and document ends stay in memory."""

    def __init__(self, bin_path: str, dtype=np.int32):
        self.dtype = _canonical(dtype)
        self._code = dtype_code(self.dtype)
        self.bin_path = str(bin_path)
        # array.array: 4 and 8 bytes per entry, where a list of ints costs ~36.
        self.sequence_lengths = array.array("i")
        self.document_indices = array.array("q", [0])
        self._file = open(self.bin_path, "wb")

    def _check_open(self) -> None:
        if self._file.closed:
            raise ValueError(f"builder for {self.bin_path} is already finalized")

    def add_item(self, tokens) -> None:
        self._check_open()
        arr = _checked_cast(tokens, self.dtype)
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"a sequence of {arr.size} tokens exceeds the format's int32 length field")
        self._file.write(arr.data)
        self.sequence_lengths.append(arr.size)

    def end_document(self) -> None:
        self._check_open()
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths=None) -> None:
        self._check_open()
        arr = _checked_cast(tokens, self.dtype)
        lengths = [arr.size] if lengths is None else [int(n) for n in lengths]
        # Megatron trusts `lengths`; a wrong sum would silently shift every later sequence's pointer.
        if any(n < 0 or n > np.iinfo(np.int32).max for n in lengths) or sum(lengths) != arr.size:
            raise ValueError(f"sequence lengths {lengths} do not split a document of {arr.size} tokens")
        self._file.write(arr.data)
        self.sequence_lengths.extend(lengths)
        self.end_document()

    def _check_document_boundary(self, action: str) -> None:
        pending = len(self.sequence_lengths) - self.document_indices[-1]
        if pending:
            raise ValueError(f"{pending} sequence(s) added after the last end_document(); call it before {action}")

    def add_index(self, path_prefix: str) -> None:
        self._check_open()
        self._check_document_boundary("add_index()")
        other = IndexedDataset(path_prefix)  # fully validated: a corrupt shard must not poison the merge
        if other.dtype != self.dtype:
            raise ValueError(f"cannot merge {path_prefix} ({other.dtype.name}) into a {self.dtype.name} dataset")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.frombytes(np.asarray(other.sequence_lengths, dtype=np.intc).tobytes())
        shifted = np.asarray(other.document_indices[1:], dtype=np.longlong) + offset
        self.document_indices.frombytes(shifted.tobytes())
        nbytes = other.num_tokens * self.dtype.itemsize
        del other
        self._file.flush()
        with open(data_file_path(path_prefix), "rb") as src:
            while nbytes:
                chunk = src.read(min(nbytes, _COPY_CHUNK))
                if not chunk:
                    raise DataError(data_file_path(path_prefix), "data file shrank while it was being merged")
                self._file.write(chunk)
                nbytes -= len(chunk)

    def finalize(self, idx_path: str) -> None:
        self._check_open()
        self._check_document_boundary("finalize()")
        self._file.close()
        lengths = np.frombuffer(self.sequence_lengths, dtype=np.intc).astype("<i4")
        pointers = np.zeros(len(lengths), dtype="<i8")
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        docs = np.frombuffer(self.document_indices, dtype=np.longlong).astype("<i8")
        # Written beside the target and renamed, so a reader never sees a half-written index.
        tmp = f"{idx_path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(lengths), len(docs)))
            for part in (lengths, pointers, docs):
                f.write(part.data)
        os.replace(tmp, idx_path)


class IndexedDataset:
    """Read-only, zero-copy view of a dataset; opening validates the index against the .bin, so a sample is right or
    the open fails."""

    def __init__(self, path_prefix: str):
        self.path_prefix = str(path_prefix)
        self.idx_path = index_file_path(self.path_prefix)
        self.bin_path = data_file_path(self.path_prefix)
        self._content_hash: Optional[str] = None
        for path, what in ((self.idx_path, "index"), (self.bin_path, "data")):
            if not os.path.isfile(path):
                raise DataError(path, f"{what} file not found (an indexed dataset needs both .bin and .idx)")
        self._open_index()
        self._validate_index()
        self._open_data()

    def _open_index(self) -> None:
        path, size = self.idx_path, os.path.getsize(self.idx_path)
        if size == 0:
            raise DataError(path, "index file is empty")
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if head[: len(MAGIC)] != MAGIC[: len(head)]:  # a short file that starts right is merely truncated
            raise DataError(path, f"not a Megatron index: expected magic {MAGIC!r} at byte 0, found {head[:9]!r}")
        if size < HEADER_SIZE:
            raise DataError(path, f"truncated index: {size} bytes, the header alone needs {HEADER_SIZE}")
        _, version, code, n_seq, n_doc = _HEADER.unpack(head)
        if version != VERSION:
            raise DataError(path, f"unsupported index version {version} at byte 9 (only {VERSION} is supported)")
        if code not in DTYPE_CODES:
            known = ", ".join(f"{c}={np.dtype(t).name}" for c, t in DTYPE_CODES.items())
            raise DataError(path, f"unknown dtype code {code} at byte 17 (known: {known})")
        expected = HEADER_SIZE + 12 * n_seq + 8 * n_doc
        if size < expected:
            raise DataError(
                path,
                f"truncated index: the header declares {n_seq} sequences and {n_doc} document indices, "
                f"which need {expected} bytes, but the file has {size}",
            )
        trailing = size - expected
        if trailing not in (0, n_seq):
            raise DataError(path, f"{trailing} unexpected bytes after the document indices (from byte {expected})")
        self._dtype = _canonical(DTYPE_CODES[code])
        self._idx = np.memmap(path, dtype=np.uint8, mode="r")
        self._lengths = np.frombuffer(self._idx, dtype="<i4", count=n_seq, offset=HEADER_SIZE)
        self._pointers = np.frombuffer(self._idx, dtype="<i8", count=n_seq, offset=HEADER_SIZE + 4 * n_seq)
        self._docs = np.frombuffer(self._idx, dtype="<i8", count=n_doc, offset=HEADER_SIZE + 12 * n_seq)
        self._modes = np.frombuffer(self._idx, dtype=np.int8, count=n_seq, offset=expected) if trailing else None

    def content_hash(self) -> str:
        """SHA-256 of the .idx file (sequence lengths, offsets, document boundaries): what the cached sample
        indices depend on (megaeff/data/gpt_dataset.py keys its cache on it). Reading is about 1 s per GB of
        index, about 80M sequences; computed once per open."""
        if self._content_hash is None:
            h = hashlib.sha256()
            chunk = 1 << 26
            for lo in range(0, len(self._idx), chunk):
                h.update(memoryview(self._idx[lo : lo + chunk]))
            self._content_hash = h.hexdigest()
        return self._content_hash

    def _validate_index(self) -> None:
        path, docs, lengths, ptrs = self.idx_path, self._docs, self._lengths, self._pointers
        n_seq, isz = len(lengths), self._dtype.itemsize
        if len(docs) == 0 or docs[0] != 0:
            found = int(docs[0]) if len(docs) else "no entries"
            raise DataError(path, f"document indices must start with 0, found {found}")
        i = _first_true(len(docs) - 1, lambda a, b: docs[a + 1 : b + 1] < docs[a:b])
        if i is not None:
            raise DataError(path, f"document indices decrease at entry {i + 1} ({docs[i]} then {docs[i + 1]})")
        if docs[-1] != n_seq:
            raise DataError(path, f"last document index is {docs[-1]} but there are {n_seq} sequences")
        i = _first_true(n_seq, lambda a, b: lengths[a:b] < 0)
        if i is not None:
            raise DataError(path, f"sequence {i} has negative length {lengths[i]}")
        if n_seq and ptrs[0] != 0:
            raise DataError(path, f"sequence 0 starts at byte {ptrs[0]} of the data file, expected 0")
        i = _first_true(n_seq - 1, lambda a, b: ptrs[a + 1 : b + 1] != self._ends(a, b))
        if i is not None:
            raise DataError(
                path,
                f"sequence {i + 1} starts at byte {ptrs[i + 1]} but sequence {i} ({lengths[i]} tokens of "
                f"{isz} bytes from byte {ptrs[i]}) ends at {self._ends(i, i + 1)[0]}",
            )
        self._nbytes = int(self._ends(n_seq - 1, n_seq)[0]) if n_seq else 0

    def _ends(self, a: int, b: int) -> np.ndarray:
        """Byte offsets in the .bin where sequences [a, b) end."""
        return self._pointers[a:b] + self._lengths[a:b].astype(np.int64) * self._dtype.itemsize

    def _open_data(self) -> None:
        size, need = os.path.getsize(self.bin_path), self._nbytes
        if size < need:
            i = _first_true(len(self), lambda a, b: self._ends(a, b) > size)
            raise DataError(
                self.bin_path,
                f"truncated data file: {size} bytes but the index needs {need}; sequence {i} is the first that "
                f"does not fit (bytes {self._pointers[i]}..{self._ends(i, i + 1)[0]})",
            )
        if size > need:
            raise DataError(self.bin_path, f"data file has {size} bytes but its index describes {need}: mismatched?")
        # numpy cannot map an empty file; a dataset of only empty sequences has one.
        self._bin = np.memmap(self.bin_path, dtype=np.uint8, mode="r") if size else np.empty(0, np.uint8)

    # Pickling (DataLoader workers under spawn) reopens the files instead of copying the mapped bytes.
    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path_prefix"])

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        if not isinstance(idx, (int, np.integer)) or isinstance(idx, bool):
            raise TypeError(f"sequence index must be an int, got {type(idx).__name__}")
        if not 0 <= idx < len(self._lengths):  # no negative indexing: it hides off-by-one bugs in callers
            raise IndexError(f"sequence {idx} out of range [0, {len(self._lengths)}) in {self.path_prefix}")
        i = int(idx)
        n = int(self._lengths[i])
        offset = int(offset)
        length = n - offset if length is None else int(length)
        # Megatron would read on into the next sequence here; that is a silently wrong sample.
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {n}")
        start = int(self._pointers[i]) + offset * self._dtype.itemsize
        return np.frombuffer(self._bin, dtype=self._dtype, count=length, offset=start)

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self._lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        return self._docs

    @property
    def sequence_modes(self) -> np.ndarray | None:  # int8 per sequence in a multimodal index, else None
        return self._modes

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def num_tokens(self) -> int:
        return self._nbytes // self._dtype.itemsize

    @property
    def num_documents(self) -> int:
        return len(self._docs) - 1

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(index_file_path(path_prefix)) and os.path.isfile(data_file_path(path_prefix))

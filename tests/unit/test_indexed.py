"""The Megatron mmap indexed dataset: round trips, merging, zero-copy reads and every way a file pair can be bad."""

from __future__ import annotations

import array
import pickle
import struct
import tracemalloc

import numpy as np
import pytest

from megaeff.data.indexed import (
    DTYPE_CODES,
    HEADER_SIZE,
    IndexedDataset,
    IndexedDatasetBuilder,
    data_file_path,
    dtype_code,
    index_file_path,
    optimal_dtype,
)
from megaeff.errors import DataError


def random_docs(seed: int, n: int, dtype, max_len: int = 50) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    hi = min(np.iinfo(dtype).max, 200_000)
    # Some empty documents on purpose: they are legal and easy to get wrong.
    return [rng.integers(0, hi, size=rng.integers(0, max_len), dtype=np.int64).astype(dtype) for _ in range(n)]


def write(prefix, docs, dtype, split=False) -> str:
    """One sequence per document, or (split) each document cut into pieces of at most 7 tokens."""
    b = IndexedDatasetBuilder(data_file_path(prefix), dtype=dtype)
    for doc in docs:
        if split:
            b.add_document(doc, lengths=[len(p) for p in np.array_split(doc, max(1, -(-len(doc) // 7)))])
        else:
            b.add_item(doc)
            b.end_document()
    b.finalize(index_file_path(prefix))
    return str(prefix)


@pytest.fixture
def prefix(tmp_path):
    docs = [np.array([5, 6, 7], np.uint16), np.array([8], np.uint16), np.array([9, 10, 11, 12], np.uint16)]
    return write(tmp_path / "ds", docs, np.uint16), docs


# ----------------------------------------------------------------------------- dtypes and paths
def test_dtype_codes_match_megatron_numbering():
    assert {c: np.dtype(t).name for c, t in DTYPE_CODES.items()} == {
        1: "uint8",
        2: "int8",
        3: "int16",
        4: "int32",
        5: "int64",
        6: "float64",
        7: "float32",
        8: "uint16",
    }
    assert dtype_code(np.uint16) == 8 and dtype_code(np.dtype("int32")) == 4 and dtype_code(">i8") == 5
    with pytest.raises(ValueError, match="uint32"):
        dtype_code(np.uint32)  # the format has no code for it


@pytest.mark.parametrize("vocab,expected", [(1, np.uint16), (65499, np.uint16), (65500, np.int32), (128256, np.int32)])
def test_optimal_dtype_boundaries(vocab, expected):
    assert optimal_dtype(vocab) == np.dtype(expected)


def test_paths_and_exists(tmp_path, prefix):
    p, _ = prefix
    assert data_file_path("a/b") == "a/b.bin" and index_file_path("a/b") == "a/b.idx"
    assert IndexedDataset.exists(p) and not IndexedDataset.exists(str(tmp_path / "nope"))
    (tmp_path / "half.idx").write_bytes(b"x")
    assert not IndexedDataset.exists(str(tmp_path / "half"))


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_round_trip_random_documents(tmp_path, dtype):
    docs = random_docs(1, 200, dtype)
    ds = IndexedDataset(write(tmp_path / "rt", docs, dtype))
    assert len(ds) == 200 and ds.num_documents == 200 and ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(len(d) for d in docs)
    assert ds.sequence_lengths.dtype == np.int32 and ds.sequence_lengths.tolist() == [len(d) for d in docs]
    assert ds.sequence_pointers.dtype == np.int64 and ds.document_indices.dtype == np.int64
    assert ds.document_indices.tolist() == list(range(201))
    byte_ends = np.cumsum([len(d) * np.dtype(dtype).itemsize for d in docs])
    assert ds.sequence_pointers.tolist() == [0] + byte_ends[:-1].tolist()
    for i, doc in enumerate(docs):
        got = ds[i]
        assert got.dtype == np.dtype(dtype) and np.array_equal(got, doc)
    assert ds.sequence_modes is None


def test_multi_sequence_documents(tmp_path):
    docs = random_docs(2, 30, np.int32, max_len=40)
    ds = IndexedDataset(write(tmp_path / "ms", docs, np.int32, split=True))
    assert ds.num_documents == 30 and len(ds) > 30
    di = ds.document_indices
    assert di[0] == 0 and di[-1] == len(ds) and (np.diff(di) >= 0).all()
    for d, doc in enumerate(docs):
        pieces = [ds[s] for s in range(di[d], di[d + 1])]
        assert all(len(p) <= 7 for p in pieces)
        assert np.array_equal(np.concatenate(pieces) if pieces else np.empty(0, np.int32), doc)


def test_items_and_documents_mixed(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "mx.bin"), dtype=np.int32)
    b.add_item([1, 2])
    b.add_item(np.array([3], dtype=np.int64))
    b.end_document()
    b.end_document()  # an empty document
    b.add_document([4, 5, 6, 7], lengths=[1, 3])
    b.finalize(str(tmp_path / "mx.idx"))
    ds = IndexedDataset(str(tmp_path / "mx"))
    assert ds.document_indices.tolist() == [0, 2, 2, 4]
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4], [5, 6, 7]]
    assert ds.num_documents == 3 and ds.num_tokens == 7


def test_empty_dataset(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "e.bin"), dtype=np.uint16)
    b.finalize(str(tmp_path / "e.idx"))
    ds = IndexedDataset(str(tmp_path / "e"))
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0
    assert (tmp_path / "e.idx").stat().st_size == HEADER_SIZE + 8  # header + the leading 0 document index


def test_zero_copy_and_read_only(prefix):
    p, docs = prefix
    ds = IndexedDataset(p)
    seq = ds[2]
    assert np.shares_memory(seq, ds._bin) and isinstance(seq.base, np.memmap)
    assert np.shares_memory(ds.get(2, 1, 2), seq)
    assert not seq.flags.writeable  # a stray in-place op must not corrupt the corpus
    assert np.shares_memory(ds.sequence_lengths, ds._idx)


def test_get_sub_ranges(prefix):
    p, docs = prefix
    ds = IndexedDataset(p)
    assert ds.get(2).tolist() == [9, 10, 11, 12]
    assert ds.get(2, offset=1).tolist() == [10, 11, 12]
    assert ds.get(2, offset=1, length=2).tolist() == [10, 11]
    assert ds.get(2, 0, 0).tolist() == [] and ds.get(2, 4).tolist() == []
    assert ds.get(np.int64(0), 2, 1).tolist() == [7]
    # Reading past the sequence would silently return the next sequence's tokens in Megatron.
    for off, n in [(3, 2), (-1, 1), (0, 5), (5, None), (1, -1)]:
        with pytest.raises(IndexError):
            ds.get(2, off, n)


def test_index_errors(prefix):
    ds = IndexedDataset(prefix[0])
    for bad in (3, -1, 100):
        with pytest.raises(IndexError):
            ds[bad]
    with pytest.raises(TypeError):
        ds[0.0]


def test_pickle_reopens_instead_of_copying(prefix):
    ds = IndexedDataset(prefix[0])
    blob = pickle.dumps(ds)
    assert len(blob) < 200  # only the prefix travels, not the mapped bytes
    again = pickle.loads(blob)
    assert isinstance(again[1].base, np.memmap) and again[2].tolist() == [9, 10, 11, 12]


# ----------------------------------------------------------------------------- builder checks
def test_out_of_range_tokens_rejected(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "r.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match="70000 at position 1"):
        b.add_item([1, 70000])
    with pytest.raises(ValueError, match="out of range"):
        b.add_item(np.array([-1], dtype=np.int64))
    with pytest.raises(ValueError, match="out of range"):
        b.add_document(np.array([65536], dtype=np.int32))
    with pytest.raises(ValueError, match="non-integer"):
        b.add_item([1.5])
    with pytest.raises(ValueError, match="one-dimensional"):
        b.add_item(np.zeros((2, 2), np.int32))
    b.add_item([0, 65535])  # the extremes fit
    b.end_document()
    b.finalize(str(tmp_path / "r.idx"))
    ds = IndexedDataset(str(tmp_path / "r"))
    assert len(ds) == 1 and ds[0].tolist() == [0, 65535]  # rejected items left no trace
    i32 = IndexedDatasetBuilder(str(tmp_path / "r32.bin"), dtype=np.int32)
    with pytest.raises(ValueError, match="out of range"):
        i32.add_item(np.array([2**31], dtype=np.int64))


def test_builder_misuse(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "u.bin"), dtype=np.int32)
    with pytest.raises(ValueError, match="do not split"):
        b.add_document([1, 2, 3], lengths=[1, 1])
    b.add_item([1])
    with pytest.raises(ValueError, match="end_document"):
        b.finalize(str(tmp_path / "u.idx"))  # would write an index Megatron itself refuses to open
    b.end_document()
    b.finalize(str(tmp_path / "u.idx"))
    with pytest.raises(ValueError, match="finalized"):
        b.add_item([2])
    with pytest.raises(ValueError, match="no code"):
        IndexedDatasetBuilder(str(tmp_path / "v.bin"), dtype=np.uint32)


# ----------------------------------------------------------------------------- merging shards
def test_merge_three_shards_equals_single_build(tmp_path):
    shards = [random_docs(10 + k, 40, np.uint16) for k in range(3)]
    prefixes = [write(tmp_path / f"shard{k}", docs, np.uint16, split=bool(k % 2)) for k, docs in enumerate(shards)]
    merged = IndexedDatasetBuilder(str(tmp_path / "merged.bin"), dtype=np.uint16)
    for p in prefixes:
        merged.add_index(p)
    merged.finalize(str(tmp_path / "merged.idx"))

    single = IndexedDatasetBuilder(str(tmp_path / "single.bin"), dtype=np.uint16)
    for k, docs in enumerate(shards):
        for doc in docs:
            if k % 2:
                single.add_document(doc, lengths=[len(p) for p in np.array_split(doc, max(1, -(-len(doc) // 7)))])
            else:
                single.add_item(doc)
                single.end_document()
    single.finalize(str(tmp_path / "single.idx"))

    for ext in ("bin", "idx"):
        assert (tmp_path / f"merged.{ext}").read_bytes() == (tmp_path / f"single.{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "merged"))
    assert ds.num_documents == 120
    assert np.array_equal(np.concatenate([ds[i] for i in range(len(ds))]), np.concatenate(sum(shards, [])))


def test_merge_after_own_documents_and_small_copy_chunks(tmp_path, monkeypatch):
    import megaeff.data.indexed as indexed

    monkeypatch.setattr(indexed, "_COPY_CHUNK", 3)  # the .bin copy is chunked; exercise chunk boundaries
    shard = write(tmp_path / "s", [np.arange(10, dtype=np.int32), np.arange(5, dtype=np.int32)], np.int32)
    b = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    b.add_document([100, 101])
    b.add_index(shard)
    b.add_document([102])
    b.finalize(str(tmp_path / "m.idx"))
    ds = IndexedDataset(str(tmp_path / "m"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[100, 101], list(range(10)), list(range(5)), [102]]
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]


def test_merge_dtype_mismatch_and_pending_items(tmp_path, prefix):
    b = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.int32)
    with pytest.raises(ValueError, match="uint16.*int32"):
        b.add_index(prefix[0])
    b.add_item([1])
    with pytest.raises(ValueError, match="end_document"):
        b.add_index(prefix[0])


def test_merge_refuses_corrupt_shard(tmp_path, prefix):
    p, _ = prefix
    with open(p + ".bin", "r+b") as f:
        f.truncate(10)
    b = IndexedDatasetBuilder(str(tmp_path / "y.bin"), dtype=np.uint16)
    with pytest.raises(DataError, match="truncated"):
        b.add_index(p)


# ----------------------------------------------------------------------------- memory
def test_builder_memory_stays_flat(tmp_path):
    n_docs, doc_len = 1000, 2000  # 2M int32 tokens = 8 MB
    b = IndexedDatasetBuilder(str(tmp_path / "big.bin"), dtype=np.int32)
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        for _ in range(n_docs):
            b.add_document(rng.integers(0, 100_000, size=doc_len, dtype=np.int32))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    token_bytes = n_docs * doc_len * 4
    assert peak < token_bytes / 50, f"peak {peak} bytes while streaming {token_bytes} bytes of tokens"
    # The builder keeps only compact per-sequence / per-document arrays, nothing token-sized.
    for name, value in vars(b).items():
        assert not isinstance(value, (np.ndarray, bytes, bytearray, list)), name
    assert isinstance(b.sequence_lengths, array.array) and len(b.sequence_lengths) == n_docs
    assert isinstance(b.document_indices, array.array) and len(b.document_indices) == n_docs + 1
    b.finalize(str(tmp_path / "big.idx"))
    ds = IndexedDataset(str(tmp_path / "big"))
    assert ds.num_tokens == n_docs * doc_len and (tmp_path / "big.bin").stat().st_size == token_bytes


# ----------------------------------------------------------------------------- corrupt files
def corrupt_idx(prefix: str, pos: int, data: bytes) -> str:
    with open(prefix + ".idx", "r+b") as f:
        f.seek(pos)
        f.write(data)
    return prefix + ".idx"


def expect_error(prefix: str, path: str, *fragments: str) -> DataError:
    with pytest.raises(DataError) as exc:
        IndexedDataset(prefix)
    assert exc.value.path == path
    for frag in fragments:
        assert frag in str(exc.value), str(exc.value)
    return exc.value


def test_missing_files(tmp_path, prefix):
    p, _ = prefix
    expect_error(str(tmp_path / "absent"), str(tmp_path / "absent.idx"), "not found")
    (tmp_path / "ds.bin").unlink()
    expect_error(p, p + ".bin", "not found")


def test_empty_files(tmp_path, prefix):
    p, _ = prefix
    (tmp_path / "ds.bin").write_bytes(b"")
    expect_error(p, p + ".bin", "truncated data file", "0 bytes", "sequence 0")
    (tmp_path / "ds.idx").write_bytes(b"")
    expect_error(p, p + ".idx", "empty")


def test_wrong_magic(prefix):
    p, _ = prefix
    path = corrupt_idx(p, 0, b"NOTANIDX\x00")
    expect_error(p, path, "magic", "NOTANIDX")


def test_wrong_version(prefix):
    p, _ = prefix
    path = corrupt_idx(p, 9, struct.pack("<Q", 2))
    expect_error(p, path, "version 2", "byte 9")


def test_unknown_dtype_code(prefix):
    p, _ = prefix
    path = corrupt_idx(p, 17, struct.pack("<B", 9))
    expect_error(p, path, "dtype code 9", "byte 17")


@pytest.mark.parametrize("keep", [5, 20, HEADER_SIZE, HEADER_SIZE + 13, -1])
def test_truncated_index(prefix, keep):
    p, _ = prefix
    path = p + ".idx"
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.truncate(size + keep if keep < 0 else keep)
    expect_error(p, path, "truncated index")


def test_trailing_garbage_in_index(prefix):
    p, _ = prefix
    with open(p + ".idx", "ab") as f:
        f.write(b"\x00" * 5)  # 3 sequences: 3 trailing bytes would be a multimodal modes section, 5 is not
    expect_error(p, p + ".idx", "5 unexpected bytes")


def test_truncated_bin_names_first_bad_sequence(prefix):
    p, _ = prefix  # uint16 sequences at bytes [0,6) [6,8) [8,16)
    with open(p + ".bin", "r+b") as f:
        f.truncate(7)
    expect_error(p, p + ".bin", "truncated data file", "7 bytes", "needs 16", "sequence 1")


def test_bin_longer_than_index(prefix):
    p, _ = prefix
    with open(p + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    expect_error(p, p + ".bin", "18 bytes", "describes 16")


def test_document_indices_validated(prefix):
    p, _ = prefix  # 3 sequences, document indices [0, 1, 2, 3] start at byte 34 + 12*3
    docs_at = HEADER_SIZE + 12 * 3
    path = corrupt_idx(p, docs_at, struct.pack("<q", 1))
    expect_error(p, path, "start with 0", "found 1")
    corrupt_idx(p, docs_at, struct.pack("<qqqq", 0, 2, 1, 3))
    expect_error(p, path, "decrease at entry 2")
    corrupt_idx(p, docs_at, struct.pack("<qqqq", 0, 1, 2, 2))
    expect_error(p, path, "last document index is 2", "3 sequences")


def test_inconsistent_pointers_and_lengths(prefix):
    p, _ = prefix  # lengths at byte 34, pointers at 34 + 4*3
    path = corrupt_idx(p, HEADER_SIZE + 12 + 8 * 2, struct.pack("<q", 10))
    expect_error(p, path, "sequence 2 starts at byte 10", "ends at 8")
    corrupt_idx(p, HEADER_SIZE + 12, struct.pack("<qqq", 2, 8, 10))
    expect_error(p, path, "sequence 0 starts at byte 2")
    corrupt_idx(p, HEADER_SIZE + 12, struct.pack("<qqq", 0, 6, 8))
    corrupt_idx(p, HEADER_SIZE, struct.pack("<i", 4))  # length of sequence 0 no longer matches pointer 1
    expect_error(p, path, "sequence 1 starts at byte 6", "sequence 0 (4 tokens")
    corrupt_idx(p, HEADER_SIZE, struct.pack("<iii", 3, 1, -4))
    expect_error(p, path, "sequence 2 has negative length")


def test_multimodal_modes_section_is_read(prefix):
    p, _ = prefix
    with open(p + ".idx", "ab") as f:
        f.write(np.array([0, 1, 2], np.int8).tobytes())
    ds = IndexedDataset(p)
    assert ds.sequence_modes.tolist() == [0, 1, 2] and ds[2].tolist() == [9, 10, 11, 12]


def test_validation_scans_in_chunks(tmp_path, monkeypatch):
    import megaeff.data.indexed as indexed

    monkeypatch.setattr(indexed, "_CHUNK", 7)  # many chunks, so a fault far from chunk 0 must still be found
    docs = random_docs(5, 100, np.int32, max_len=20)
    p = write(tmp_path / "ch", docs, np.int32, split=True)
    ds = IndexedDataset(p)
    assert np.array_equal(np.concatenate([ds[i] for i in range(len(ds))]), np.concatenate(docs))
    n_seq = len(ds)
    victim = n_seq - 3
    good = int(ds.sequence_pointers[victim])
    del ds
    path = corrupt_idx(p, HEADER_SIZE + 4 * n_seq + 8 * victim, struct.pack("<q", good + 4))
    expect_error(p, path, f"sequence {victim} starts at byte {good + 4}")
    corrupt_idx(p, HEADER_SIZE + 4 * n_seq + 8 * victim, struct.pack("<q", good))
    corrupt_idx(p, HEADER_SIZE + 12 * n_seq + 8 * 90, struct.pack("<q", 0))
    expect_error(p, path, "decrease at entry 90")

"""megaeff's indexed dataset against the real megatron-core package and against a hand-packed fixture.

The fixture is written from the format description with struct.pack, so a bug shared by megaeff and Megatron (or a
change in Megatron) cannot make both sides agree on the wrong bytes.
"""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
import torch

from megaeff.data.indexed import IndexedDataset, IndexedDatasetBuilder

MAGIC = b"MMIDIDX\x00\x00"

# Megatron's builder calls numpy.array(torch_tensor, dtype=...), which numpy 2 flags; not our code's concern.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


@pytest.fixture(scope="module")
def mcore():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit / megatron import-time notices
        from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def sample_docs(seed: int, dtype) -> list[tuple[np.ndarray, list[int] | None]]:
    """(tokens, lengths) per document; lengths None means one sequence. Includes empty documents and sequences."""
    rng = np.random.default_rng(seed)
    hi = min(np.iinfo(dtype).max, 150_000)
    docs = []
    for k in range(60):
        tokens = rng.integers(0, hi, size=int(rng.integers(0, 40)), dtype=np.int64).astype(dtype)
        if k % 3 == 1 and len(tokens) > 2:
            cut = sorted(rng.integers(0, len(tokens), size=2).tolist())
            docs.append((tokens, [cut[0], cut[1] - cut[0], len(tokens) - cut[1]]))
        else:
            docs.append((tokens, None))
    docs[5] = (np.array([0, hi], dtype=dtype), None)  # the dtype's extremes
    docs[6] = (np.empty(0, dtype=dtype), None)
    return docs


def write_megaeff(prefix: str, docs, dtype) -> str:
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for k, (tokens, lengths) in enumerate(docs):
        if lengths is None and k % 2:
            b.add_item(tokens)
            b.end_document()
        else:
            b.add_document(tokens, lengths)
    b.finalize(prefix + ".idx")
    return prefix


def write_megatron(mcore, prefix: str, docs, dtype) -> str:
    b = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for k, (tokens, lengths) in enumerate(docs):
        if lengths is None and k % 2:
            b.add_item(torch.from_numpy(tokens.astype(np.int64)))
            b.end_document()
        else:
            b.add_document(torch.from_numpy(tokens.astype(np.int64)), lengths or [len(tokens)])
    b.finalize(prefix + ".idx")
    return prefix


def assert_same_dataset(ours: IndexedDataset, theirs) -> None:
    assert len(ours) == len(theirs) > 0
    assert ours.dtype == np.dtype(theirs.index.dtype)
    assert np.array_equal(ours.sequence_lengths, theirs.sequence_lengths)
    assert np.array_equal(ours.sequence_pointers, theirs.index.sequence_pointers)
    assert np.array_equal(ours.document_indices, theirs.document_indices)
    for i in range(len(ours)):
        a, b = ours[i], theirs[i]
        assert a.dtype == b.dtype and np.array_equal(a, b), i
        if len(a) >= 3:
            assert np.array_equal(ours.get(i, 1, len(a) - 2), theirs.get(i, 1, len(a) - 2))
    assert np.array_equal(np.concatenate(theirs[0 : len(theirs)]), np.concatenate([ours[i] for i in range(len(ours))]))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_megatron_reads_megaeff_files(mcore, tmp_path, dtype):
    docs = sample_docs(1, dtype)
    prefix = write_megaeff(str(tmp_path / "ours"), docs, dtype)
    assert_same_dataset(IndexedDataset(prefix), mcore.IndexedDataset(prefix))
    assert mcore.IndexedDataset(prefix).document_indices.tolist() == IndexedDataset(prefix).document_indices.tolist()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megaeff_reads_megatron_files(mcore, tmp_path, dtype):
    docs = sample_docs(2, dtype)
    prefix = write_megatron(mcore, str(tmp_path / "theirs"), docs, dtype)
    ours = IndexedDataset(prefix)
    assert_same_dataset(ours, mcore.IndexedDataset(prefix))
    # And against the source documents, not only against Megatron's reader.
    flat = np.concatenate([t for t, _ in docs])
    assert ours.num_tokens == len(flat) and ours.num_documents == len(docs)
    assert np.array_equal(np.concatenate([ours[i] for i in range(len(ours))]), flat)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_byte_identical_to_megatron(mcore, tmp_path, dtype):
    docs = sample_docs(3, dtype)
    ours = write_megaeff(str(tmp_path / "ours"), docs, dtype)
    theirs = write_megatron(mcore, str(tmp_path / "theirs"), docs, dtype)
    for ext in (".bin", ".idx"):
        with open(ours + ext, "rb") as a, open(theirs + ext, "rb") as b:
            assert a.read() == b.read(), ext


def test_merged_shards_byte_identical_to_megatron_merge(mcore, tmp_path):
    shards = [(sample_docs(10 + k, np.uint16), str(tmp_path / f"shard{k}")) for k in range(3)]
    for docs, prefix in shards:
        write_megaeff(prefix, docs, np.uint16)
    ours = IndexedDatasetBuilder(str(tmp_path / "ours.bin"), dtype=np.uint16)
    theirs = mcore.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for _, prefix in shards:
        ours.add_index(prefix)
        theirs.add_index(prefix)
    ours.finalize(str(tmp_path / "ours.idx"))
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes(), ext
    assert IndexedDataset(str(tmp_path / "ours")).num_documents == 180


def test_megatron_multimodal_index_is_read(mcore, tmp_path):
    prefix = str(tmp_path / "mm")
    b = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16, multimodal=True)
    b.add_item(torch.tensor([1, 2, 3]), mode=0)
    b.add_item(torch.tensor([4, 5]), mode=1)
    b.end_document()
    b.add_document(torch.tensor([6, 7, 8, 9]), lengths=[1, 3], modes=[1, 0])
    b.finalize(prefix + ".idx")
    ours, theirs = IndexedDataset(prefix), mcore.IndexedDataset(prefix, multimodal=True)
    assert ours.sequence_modes.tolist() == theirs.index.sequence_modes.tolist() == [0, 1, 1, 0]
    assert [ours[i].tolist() for i in range(4)] == [[1, 2, 3], [4, 5], [6], [7, 8, 9]]
    assert ours.document_indices.tolist() == [0, 2, 4]


# ----------------------------------------------------------------------------- hand-packed fixture
# Three documents: [1, 2, 3] as one sequence; an empty document; [65535, 0, 7, 8, 9] split into 2 + 3 tokens.
FIXTURE_DOCS = [([1, 2, 3], None), ([], "empty"), ([65535, 0, 7, 8, 9], [2, 3])]
FIXTURE_TOKENS = [1, 2, 3, 65535, 0, 7, 8, 9]
FIXTURE_LENGTHS = [3, 2, 3]
FIXTURE_DOC_INDICES = [0, 1, 1, 3]


def hand_packed(code: int, itemsize: int, fmt: str) -> tuple[bytes, bytes]:
    pointers = [0, 3 * itemsize, 5 * itemsize]
    idx = (
        MAGIC
        + struct.pack("<Q", 1)  # version
        + struct.pack("<B", code)
        + struct.pack("<Q", 3)  # sequence count
        + struct.pack("<Q", 4)  # document count = len(document indices)
        + struct.pack("<3i", *FIXTURE_LENGTHS)
        + struct.pack("<3q", *pointers)
        + struct.pack("<4q", *FIXTURE_DOC_INDICES)
    )
    return struct.pack(f"<8{fmt}", *FIXTURE_TOKENS), idx


def write_fixture_docs(prefix: str, dtype) -> None:
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    b.add_item(FIXTURE_DOCS[0][0])
    b.end_document()
    b.end_document()
    b.add_document(FIXTURE_DOCS[2][0], lengths=FIXTURE_DOCS[2][1])
    b.finalize(prefix + ".idx")


@pytest.mark.parametrize("dtype,code,fmt", [(np.uint16, 8, "H"), (np.int32, 4, "i")])
def test_hand_packed_fixture(mcore, tmp_path, dtype, code, fmt):
    isz = np.dtype(dtype).itemsize
    bin_bytes, idx_bytes = hand_packed(code, isz, fmt)
    write_fixture_docs(str(tmp_path / "ours"), dtype)
    idx = (tmp_path / "ours.idx").read_bytes()

    # Field by field at the offsets the format fixes.
    assert len(idx) == 34 + 12 * 3 + 8 * 4 == 102
    assert idx[0:9] == b"MMIDIDX\x00\x00"
    assert idx[9:17] == b"\x01\x00\x00\x00\x00\x00\x00\x00"
    assert idx[17] == code
    assert idx[18:26] == (3).to_bytes(8, "little")
    assert idx[26:34] == (4).to_bytes(8, "little")
    assert list(struct.unpack("<3i", idx[34:46])) == FIXTURE_LENGTHS
    assert list(struct.unpack("<3q", idx[46:70])) == [0, 3 * isz, 5 * isz]
    assert list(struct.unpack("<4q", idx[70:102])) == FIXTURE_DOC_INDICES
    assert idx == idx_bytes
    assert (tmp_path / "ours.bin").read_bytes() == bin_bytes and len(bin_bytes) == 8 * isz

    # Both readers decode the hand-packed pair to the documents it was packed from.
    (tmp_path / "hand.bin").write_bytes(bin_bytes)
    (tmp_path / "hand.idx").write_bytes(idx_bytes)
    expected = [[1, 2, 3], [65535, 0], [7, 8, 9]]
    ours, theirs = IndexedDataset(str(tmp_path / "hand")), mcore.IndexedDataset(str(tmp_path / "hand"))
    assert [ours[i].tolist() for i in range(3)] == [theirs[i].tolist() for i in range(3)] == expected
    assert ours.document_indices.tolist() == FIXTURE_DOC_INDICES and ours.num_documents == 3
    assert ours.dtype == np.dtype(dtype) and ours.sequence_modes is None


def test_hand_packed_multimodal_fixture(mcore, tmp_path):
    bin_bytes, idx_bytes = hand_packed(8, 2, "H")
    (tmp_path / "mm.bin").write_bytes(bin_bytes)
    (tmp_path / "mm.idx").write_bytes(idx_bytes + struct.pack("<3b", 2, 0, 1))  # trailing int8 mode per sequence
    ours, theirs = IndexedDataset(str(tmp_path / "mm")), mcore.IndexedDataset(str(tmp_path / "mm"), multimodal=True)
    assert ours.sequence_modes.tolist() == theirs.index.sequence_modes.tolist() == [2, 0, 1]
    assert ours[2].tolist() == theirs[2][0].tolist() == [7, 8, 9]

"""Tokenize raw text into Megatron-format indexed datasets (`<prefix>.bin` / `<prefix>.idx`).

Inputs are JSONL files (`.jsonl`, `.json`: one JSON object per line, text under `json_key`), plain text files (any
other name: one document per file, or one per non-empty line with `text_mode="lines"`), or directories, searched
recursively for `*.jsonl`, `*.json` and `*.txt` in sorted path order. Documents keep their input order whatever the
worker count, so the output is byte-identical for any `workers`. A document that tokenizes to nothing (empty
text) is skipped and counted, as Megatron skips it; `append_eod` ends every written document with the EOS id.

Memory stays flat for inputs far larger than RAM: files are read line by line (a plain-text document file is read
whole, one at a time), at most a few batches are in flight, and the builder streams tokens to disk.

Sharding: `num_shards=K` writes `<prefix>_shard{i}of{K}`. `shard_mode="contiguous"` (default) gives shard i the
documents that start in the i-th K-th of the input bytes, so shards are consecutive runs of documents and merging
them in order reproduces the unsharded dataset byte for byte; `"round-robin"` deals document j to shard j % K
(balanced by document count, but a merge is a permutation of the unsharded order). `merge=True` merges the shards
into `<prefix>` and removes them.

Outputs are written under temporary names and renamed only when everything succeeded: a failed run leaves no
partial `<prefix>` files behind.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np

from megaeff.data.indexed import IndexedDataset, IndexedDatasetBuilder, data_file_path, index_file_path, optimal_dtype
from megaeff.errors import MegaeffError

PathLike = Union[str, os.PathLike]
JSONL_SUFFIXES = (".jsonl", ".json")
DIR_SUFFIXES = (".jsonl", ".json", ".txt")
TEXT_MODES = ("document", "lines")
SHARD_MODES = ("contiguous", "round-robin")
# A batch closes at this many documents or input bytes, whichever comes first: big enough to amortize the
# inter-process round trip, small enough that the in-flight window stays a few MB.
BATCH_DOCS = 256
BATCH_BYTES = 4 << 20
_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


class InputError(MegaeffError):
    """A bad input file or record; the message starts with `<file>:<line>:` (or `<file>:` for whole files)."""

    def __init__(self, path: PathLike, message: str, line: int = 0):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


@dataclass(frozen=True)
class _EncodeOptions:
    json_key: str
    append_eod: bool
    eod_id: int
    dtype: np.dtype


# A record is one would-be document: (file number, line number, raw bytes, kind). Line 0 means a whole file;
# an _EMPTY_FILE record carries no text: it reports an empty input file in input order, like a bad line.
_Record = Tuple[int, int, bytes, int]
_TEXT, _JSON, _EMPTY_FILE = 0, 1, 2
_EMPTY_FILE_MESSAGE = "empty input file (no documents); --allow-empty accepts it"


def shard_prefix(prefix: PathLike, index: int, num_shards: int) -> str:
    return f"{prefix}_shard{index}of{num_shards}"


def expand_inputs(inputs: Iterable[PathLike]) -> List[Path]:
    """Input files in processing order: inputs as given, each directory expanded to its matching files, sorted."""
    files: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DIR_SUFFIXES)
            if not found:
                raise InputError(path, f"directory has no {', '.join('*' + s for s in DIR_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(path, "no such file or directory")
    if not files:
        raise InputError("<inputs>", "no input files given")
    return files


def _json_text(payload: bytes, key: str) -> str:
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError as exc:
        # The decoder's own "line 1" would contradict the file's line number, so report the column only.
        raise ValueError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {exc.start} of the line)") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_JSON_TYPES.get(type(obj), type(obj).__name__)}")
    if key not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise ValueError(f"no key {key!r} in the JSON object (keys: {keys}); choose it with --json-key")
    text = obj[key]
    if not isinstance(text, str):
        raise ValueError(f"{key!r} is {_JSON_TYPES.get(type(text), type(text).__name__)}, not a string")
    return text


def _plain_text(payload: bytes, whole_file: bool) -> str:
    if not whole_file:
        payload = payload[:-1] if payload.endswith(b"\n") else payload
        payload = payload[:-1] if payload.endswith(b"\r") else payload
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {exc.start}{' of the line' if not whole_file else ''})") from None


def _encode_records(tokenizer, opts: _EncodeOptions, records: Sequence[_Record]):
    """(all tokens concatenated, per-record token counts, [(record number, error message)]).

    Errors come back as data rather than exceptions so that the parent reports the first bad record in input order.
    """
    parts: List[np.ndarray] = []
    lengths = np.zeros(len(records), dtype=np.int64)
    errors: List[Tuple[int, str]] = []
    for i, (_, line, payload, kind) in enumerate(records):
        if kind == _EMPTY_FILE:
            errors.append((i, _EMPTY_FILE_MESSAGE))
            continue
        try:
            text = _json_text(payload, opts.json_key) if kind == _JSON else _plain_text(payload, whole_file=line == 0)
        except ValueError as exc:
            errors.append((i, str(exc)))
            continue
        tokens = tokenizer.encode_array(text)
        if tokens.size == 0:  # an empty document: skipped (and counted) by the parent, as Megatron skips it
            continue
        if opts.append_eod:
            tokens = np.append(tokens, opts.eod_id)
        parts.append(tokens.astype(opts.dtype, copy=False))
        lengths[i] = tokens.size
    tokens = np.concatenate(parts) if parts else np.empty(0, opts.dtype)
    return tokens, lengths, errors


# Worker processes only: the tokenizer and options, set once per process by the pool initializer so that a
# tokenizer file is loaded once per worker rather than pickled with every batch.
_worker_state: Optional[tuple] = None


def _init_worker(tokenizer, opts: _EncodeOptions) -> None:
    global _worker_state
    _worker_state = (tokenizer, opts)
    # Ctrl-C is the parent's to handle (it terminates the pool and removes partial output); without this every
    # worker would print its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_encode(records: Sequence[_Record]):
    tokenizer, opts = _worker_state
    return _encode_records(tokenizer, opts, records)


def _read_records(
    files: Sequence[Path], text_mode: str, allow_empty: bool, counters: Dict[str, int]
) -> Iterator[Tuple[int, _Record]]:
    """(byte offset of the record in the concatenated inputs, record), streaming, in input order."""
    offset = 0
    for fi, path in enumerate(files):
        kind = _JSON if path.suffix.lower() in JSONL_SUFFIXES else _TEXT
        found = 0
        with open(path, "rb", buffering=1 << 20) as f:
            if kind == _TEXT and text_mode == "document":
                payload = f.read()
                if payload:
                    found += 1
                    yield offset, (fi, 0, payload, kind)
                offset += len(payload)
            else:
                for lineno, line in enumerate(f, 1):
                    if line.strip():  # blank lines separate nothing and are not documents
                        found += 1
                        yield offset, (fi, lineno, line, kind)
                    offset += len(line)
        if not found:
            if not allow_empty:
                yield offset, (fi, 0, b"", _EMPTY_FILE)
            counters["empty_files"] += 1


def _batches(records: Iterator[Tuple[int, _Record]]) -> Iterator[Tuple[List[int], List[_Record]]]:
    offsets: List[int] = []
    batch: List[_Record] = []
    size = 0
    for offset, record in records:
        offsets.append(offset)
        batch.append(record)
        size += len(record[2])
        if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES:
            yield offsets, batch
            offsets, batch, size = [], [], 0
    if batch:
        yield offsets, batch


def _encoded(batches, tokenizer, opts: _EncodeOptions, workers: int):
    """(offsets, records, encode result) per batch, in input order."""
    if workers <= 1:
        for offsets, batch in batches:
            yield offsets, batch, _encode_records(tokenizer, opts, batch)
        return
    # apply_async over a bounded window rather than Pool.imap: imap's feeder thread drains the whole input
    # iterator as fast as it can read, which would pull a file larger than RAM into memory.
    window = 2 * workers + 2
    pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer, opts))
    try:
        pending: deque = deque()
        for offsets, batch in batches:
            pending.append((offsets, batch, pool.apply_async(_worker_encode, (batch,))))
            if len(pending) >= window:
                offsets, batch, result = pending.popleft()
                yield offsets, batch, result.get()
        while pending:
            offsets, batch, result = pending.popleft()
            yield offsets, batch, result.get()
        pool.close()
        pool.join()
    finally:
        pool.terminate()


class _Outputs:
    """The builders of one run, writing to temporary names; `commit` renames them all, `discard` removes them."""

    def __init__(self, prefixes: Sequence[str]):
        self.prefixes = list(prefixes)
        self.tmp = [f"{p}.tmp{os.getpid()}" for p in self.prefixes]
        self.builders: List[IndexedDatasetBuilder] = []

    def open(self, dtype: np.dtype) -> None:
        for p, t in zip(self.prefixes, self.tmp):
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            self.builders.append(IndexedDatasetBuilder(data_file_path(t), dtype=dtype))

    def finalize(self) -> None:
        for t, b in zip(self.tmp, self.builders):
            b.finalize(index_file_path(t))

    def commit(self) -> None:
        for t, p in zip(self.tmp, self.prefixes):
            os.replace(data_file_path(t), data_file_path(p))
            os.replace(index_file_path(t), index_file_path(p))

    def discard(self) -> None:
        # An unfinalized builder still holds its .bin open; unlinking is fine on POSIX and the handle closes when
        # the builder is dropped with this object.
        for t in self.tmp:
            for path in (data_file_path(t), index_file_path(t)):
                if os.path.exists(path):
                    os.remove(path)
        self.builders.clear()


class _Writer:
    """Routes encoded records, in input order, to their output builder, and counts what was skipped."""

    def __init__(
        self,
        outputs: _Outputs,
        files: Sequence[Path],
        counters: Dict[str, int],
        total_bytes: int,
        shard_mode: str,
        skip_bad_lines: bool,
    ):
        self.outputs, self.files, self.counters = outputs, files, counters
        self.total_bytes, self.shard_mode, self.skip_bad_lines = max(total_bytes, 1), shard_mode, skip_bad_lines
        self.shard_docs = [0] * len(outputs.prefixes)
        self.done_bytes = 0

    def _shard(self, offset: int) -> int:
        k = len(self.shard_docs)
        if self.shard_mode == "contiguous":  # by where the document starts in the input bytes
            return min(offset * k // self.total_bytes, k - 1)
        return self.counters["docs"] % k

    def add(
        self,
        offsets: List[int],
        batch: Sequence[_Record],
        tokens: np.ndarray,
        lengths: np.ndarray,
        errors: List[Tuple[int, str]],
    ) -> None:
        bad, pos, counters = dict(errors), 0, self.counters
        for i, (fi, line, payload, kind) in enumerate(batch):
            self.done_bytes += len(payload)
            if i in bad:
                if kind == _EMPTY_FILE:
                    raise InputError(self.files[fi], bad[i])
                if not self.skip_bad_lines:
                    raise InputError(self.files[fi], bad[i] + "; --skip-bad-lines skips such records", line)
                counters["bad_lines"] += 1
                continue
            n = int(lengths[i])
            if n == 0:
                counters["empty_docs"] += 1
                continue
            shard = self._shard(offsets[i])
            builder = self.outputs.builders[shard]
            builder.add_item(tokens[pos : pos + n])
            builder.end_document()
            pos += n
            self.shard_docs[shard] += 1
            counters["docs"] += 1
            counters["tokens"] += n


class _Progress:
    def __init__(self, stream: Optional[TextIO], interval: float):
        self.stream, self.interval = stream, interval
        self.start = self.last = time.monotonic()

    def update(self, docs: int, nbytes: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.stream is None or (not force and now - self.last < self.interval):
            return
        self.last = now
        dt = max(now - self.start, 1e-9)
        print(
            f"preprocess: {docs:,} docs | {docs / dt:,.0f} docs/s | {nbytes / 1e6:,.1f} MB | "
            f"{nbytes / 1e6 / dt:,.1f} MB/s",
            file=self.stream,
            flush=True,
        )


def preprocess(
    inputs: Sequence[PathLike],
    output_prefix: PathLike,
    tokenizer,
    *,
    workers: int = 1,
    json_key: str = "text",
    text_mode: str = "document",
    append_eod: bool = False,
    num_shards: int = 1,
    shard_mode: str = "contiguous",
    merge: bool = False,
    skip_bad_lines: bool = False,
    allow_empty: bool = False,
    progress: Optional[TextIO] = None,
    log_interval: float = 1.0,
) -> Dict[str, object]:
    """Tokenize `inputs` into `output_prefix` (or its shards); returns the run's statistics.

    Raises InputError for bad input (nothing is written then). MB are 10^6 bytes of input files read.
    """
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
    if shard_mode not in SHARD_MODES:
        raise ValueError(f"shard_mode must be one of {SHARD_MODES}, got {shard_mode!r}")
    if num_shards < 1 or workers < 1:
        raise ValueError("num_shards and workers must be at least 1")
    files = expand_inputs(inputs)
    total_bytes = sum(p.stat().st_size for p in files)
    dtype = optimal_dtype(tokenizer.vocab_size)
    # Resolved up front: a tokenizer without EOS fails before any work, and only when EOD is asked for.
    opts = _EncodeOptions(json_key, append_eod, tokenizer.eod_id if append_eod else -1, dtype)

    prefix = str(output_prefix)
    sharded = num_shards > 1
    prefixes = [shard_prefix(prefix, i, num_shards) for i in range(num_shards)] if sharded else [prefix]
    counters = {"docs": 0, "tokens": 0, "empty_docs": 0, "bad_lines": 0, "empty_files": 0}
    outputs = _Outputs(prefixes)
    writer = _Writer(outputs, files, counters, total_bytes, shard_mode, skip_bad_lines)
    meter = _Progress(progress, log_interval)
    try:
        outputs.open(dtype)
        records = _read_records(files, text_mode, allow_empty, counters)
        # closing(): on an error the pool is terminated now, not whenever the suspended generator is collected.
        with contextlib.closing(_encoded(_batches(records), tokenizer, opts, workers)) as results:
            for offsets, batch, result in results:
                writer.add(offsets, batch, *result)
                meter.update(counters["docs"], writer.done_bytes)
        outputs.finalize()
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    seconds = max(time.monotonic() - meter.start, 1e-9)
    stats: Dict[str, object] = dict(
        counters,
        files=len(files),
        input_bytes=total_bytes,
        input_mb=total_bytes / 1e6,
        seconds=seconds,
        mb_per_s=total_bytes / 1e6 / seconds,
        docs_per_s=counters["docs"] / seconds,
        tokens_per_s=counters["tokens"] / seconds,
        dtype=dtype.name,
        workers=workers,
        outputs=prefixes,
        shard_docs=writer.shard_docs if sharded else None,
    )
    if sharded and merge:
        merge_shards(prefixes, prefix)
        for p in prefixes:
            os.remove(data_file_path(p))
            os.remove(index_file_path(p))
        stats["outputs"] = [prefix]
        stats["seconds"] = time.monotonic() - meter.start
    return stats


def merge_shards(prefixes: Sequence[PathLike], output_prefix: PathLike) -> Dict[str, object]:
    """Concatenate indexed datasets, in the given order, into `output_prefix` (written under a temporary name)."""
    if not prefixes:
        raise InputError("<shards>", "no shards to merge")
    datasets = []
    for p in prefixes:
        for path in (data_file_path(p), index_file_path(p)):
            if not os.path.isfile(path):
                raise InputError(path, "shard file not found")
        datasets.append(IndexedDataset(str(p)))
    dtypes = {d.dtype.name for d in datasets}
    if len(dtypes) > 1:
        listing = ", ".join(f"{p} ({d.dtype.name})" for p, d in zip(prefixes, datasets))
        raise InputError("<shards>", f"shards have different token dtypes: {listing}")
    stats = {
        "docs": sum(d.num_documents for d in datasets),
        "tokens": sum(d.num_tokens for d in datasets),
        "shards": len(datasets),
        "outputs": [str(output_prefix)],
        "dtype": datasets[0].dtype.name,
    }
    dtype = datasets[0].dtype
    del datasets
    outputs = _Outputs([str(output_prefix)])
    try:
        outputs.open(dtype)
        for p in prefixes:
            outputs.builders[0].add_index(str(p))
        outputs.finalize()
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    return stats


def summary(stats: Dict[str, object]) -> str:
    return (
        f"preprocess: done: {stats['docs']:,} docs, {stats['tokens']:,} tokens ({stats['dtype']}) from "
        f"{stats['files']} file(s), {stats['input_mb']:,.1f} MB in {stats['seconds']:.1f} s "
        f"({stats['mb_per_s']:,.1f} MB/s, {stats['docs_per_s']:,.0f} docs/s, {stats['tokens_per_s']:,.0f} tokens/s, "
        f"{stats['workers']} worker(s)); skipped {stats['bad_lines']} bad line(s), {stats['empty_docs']} empty "
        f"doc(s), {stats['empty_files']} empty file(s) -> {', '.join(stats['outputs'])} (.bin/.idx)"
    )

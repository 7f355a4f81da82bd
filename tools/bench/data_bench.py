#!/usr/bin/env python
"""Data pipeline benchmark: preprocessing throughput and memory, then sample reads from the indexed dataset.

    python tools/bench/data_bench.py --size-mb 512 --workers 2 --out bench_data.json

1. Writes a JSONL corpus of `--size-mb` MB (10^6 bytes) from the default Shakespeare corpus, streaming: one
   document per scene, each copy rotated to a different line and numbered, so no two documents are identical.
2. Runs `megaeff-preprocess-data` on it as a subprocess (`--workers`, `--tokenizer`, `--append-eod`): MB/s of
   input, docs/s, tokens/s, and peak RSS: the largest single process (getrusage of the waited-for children) and
   the sum over the process tree (sampled from /proc every 0.2 s).
3. Reads the result in a fresh subprocess through `IndexedDataset`: `--random-samples` windows of `--window`
   tokens at random token offsets (samples/s, p50/p99 latency), then every consecutive window front to back
   (sequential), and that process's peak RSS. Windows cross document boundaries as training samples do. The
   .bin was just written, so the page cache is warm: these are memory-speed reads, not disk reads.

The work directory (`--workdir`, default a new temporary one) is removed afterwards unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megaeff.data.corpus import load_plays  # noqa: E402
from megaeff.data.indexed import IndexedDataset  # noqa: E402

_SCENE = re.compile(r"\n(?=SCENE [IVXL]+\.)")


def scenes() -> List[tuple]:
    out = []
    for name, text in load_plays().items():
        out.extend((name, s) for s in _SCENE.split(text) if s.strip())
    return out


def write_corpus(path: Path, size_mb: float) -> Dict[str, float]:
    """Streams JSONL records until the file reaches size_mb; only one record is ever built at a time."""
    target = int(size_mb * 1e6)
    parts = scenes()
    written = docs = 0
    t0 = time.perf_counter()
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as f:
        copy = 0
        while written < target:
            for j, (play, scene) in enumerate(parts):
                lines = scene.split("\n")
                cut = (copy * 7919 + j * 104729) % len(lines)  # a different rotation for every copy
                text = f"{play}, copy {copy}, part {j}\n" + "\n".join(lines[cut:] + lines[:cut])
                line = json.dumps({"id": docs, "play": play, "text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                docs += 1
                if written >= target:
                    break
            copy += 1
    return {"corpus_bytes": written, "corpus_docs": docs, "corpus_write_s": time.perf_counter() - t0}


def _tree_rss_bytes(pid: int) -> Optional[int]:
    """Resident set of `pid` and all its descendants (Linux /proc), or None where /proc is unavailable."""
    total, stack = 0, [pid]
    try:
        while stack:
            p = stack.pop()
            try:
                with open(f"/proc/{p}/status") as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
                with open(f"/proc/{p}/task/{p}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
            except (FileNotFoundError, ProcessLookupError, StopIteration):
                continue  # the process ended between listing and reading
    except OSError:
        return None
    return total


def run_preprocess(corpus: Path, prefix: Path, args) -> Dict[str, object]:
    stats_path = prefix.parent / "preprocess_stats.json"
    cmd = [
        sys.executable,
        "-m",
        "megaeff.cli.preprocess_data",
        "--input",
        str(corpus),
        "--output-prefix",
        str(prefix),
        "--workers",
        str(args.workers),
        "--tokenizer",
        args.tokenizer,
        "--append-eod",
        "--log-interval",
        "10",
        "--stats-json",
        str(stats_path),
    ]
    if args.tokenizer_path:
        cmd += ["--tokenizer-path", args.tokenizer_path]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)))
    peak_tree = 0
    done = threading.Event()

    def sample():
        nonlocal peak_tree
        while not done.wait(0.2):
            rss = _tree_rss_bytes(proc.pid)
            peak_tree = max(peak_tree, rss or 0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"preprocessing failed with exit code {rc}")
    # ru_maxrss of children is the largest single descendant (KiB on Linux); valid here because nothing ran before.
    max_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    stats = json.loads(stats_path.read_text())
    return {
        "preprocess_wall_s": wall,
        "preprocess_mb_per_s": stats["input_bytes"] / 1e6 / stats["seconds"],
        "preprocess_docs_per_s": stats["docs_per_s"],
        "preprocess_tokens_per_s": stats["tokens_per_s"],
        "preprocess_seconds": stats["seconds"],
        "docs": stats["docs"],
        "tokens": stats["tokens"],
        "dtype": stats["dtype"],
        "preprocess_peak_rss_single_mb": max_rss * 1024 / 1e6 if max_rss > before else None,
        "preprocess_peak_rss_tree_mb": peak_tree / 1e6 if peak_tree else None,
        "bin_bytes": os.path.getsize(f"{prefix}.bin"),
    }


def _window(ds: IndexedDataset, starts: np.ndarray, lengths: np.ndarray, token: int, size: int) -> np.ndarray:
    """`size` tokens from global token position `token`, across documents (one sequence per document here)."""
    i = int(np.searchsorted(starts, token, side="right")) - 1
    offset, pieces, need = token - int(starts[i]), [], size
    while need:
        n = min(int(lengths[i]) - offset, need)
        if n > 0:
            pieces.append(ds.get(i, offset, n))
            need -= n
        i, offset = i + 1, 0
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def read_bench(prefix: str, window: int, random_samples: int, seed: int) -> Dict[str, object]:
    """Runs in its own process so that its peak RSS is its own."""
    t0 = time.perf_counter()
    ds = IndexedDataset(prefix)
    open_s = time.perf_counter() - t0
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    total = ds.num_tokens
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, total - window + 1, size=random_samples)
    lat = np.empty(random_samples, dtype=np.int64)
    checksum = 0
    t0 = time.perf_counter()
    for k, tok in enumerate(offsets):
        s = time.perf_counter_ns()
        sample = _window(ds, starts, lengths, int(tok), window)
        checksum += int(sample[-1])  # touch the data so the read really happens
        lat[k] = time.perf_counter_ns() - s
    random_s = time.perf_counter() - t0
    n_seq = (total - 1) // (window - 1)  # consecutive windows sharing one token, as training samples do
    t0 = time.perf_counter()
    for k in range(n_seq):
        sample = _window(ds, starts, lengths, k * (window - 1), window)
        checksum += int(sample[-1])
    seq_s = time.perf_counter() - t0
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    kb = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(VmHWM|RssAnon|RssFile):\s+(\d+) kB", status, re.M)}
    return {
        "read_open_s": open_s,
        "random_samples": random_samples,
        "random_samples_per_s": random_samples / random_s,
        "random_p50_us": float(np.percentile(lat, 50)) / 1e3,
        "random_p99_us": float(np.percentile(lat, 99)) / 1e3,
        "sequential_samples": n_seq,
        "sequential_samples_per_s": n_seq / seq_s,
        "sequential_tokens_per_s": n_seq * window / seq_s,
        "sequential_s": seq_s,
        "read_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
        "read_rss_anon_end_mb": kb.get("RssAnon", 0) * 1024 / 1e6 or None,
        "read_rss_file_end_mb": kb.get("RssFile", 0) * 1024 / 1e6 or None,
        "checksum": checksum,
    }


def run_read(prefix: Path, args) -> Dict[str, object]:
    cmd = [
        sys.executable,
        __file__,
        "--read-only",
        str(prefix),
        "--window",
        str(args.window),
        "--random-samples",
        str(args.random_samples),
    ]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"read benchmark failed:\n{out.stderr}")
    return json.loads(out.stdout)


def table(r: Dict[str, object]) -> str:
    def mb(v):
        return "n/a" if v is None else f"{v:,.0f} MB"

    rows = [
        (
            "corpus",
            f"{r['corpus_bytes'] / 1e6:,.0f} MB JSONL, {r['corpus_docs']:,} docs "
            f"(written in {r['corpus_write_s']:.1f} s)",
        ),
        ("dataset", f"{r['docs']:,} docs, {r['tokens']:,} tokens ({r['dtype']}), .bin {r['bin_bytes'] / 1e6:,.0f} MB"),
        (
            f"preprocess ({r['workers']} workers, {r['tokenizer']})",
            f"{r['preprocess_mb_per_s']:,.1f} MB/s | {r['preprocess_docs_per_s']:,.0f} docs/s | "
            f"{r['preprocess_tokens_per_s'] / 1e6:,.2f} M tokens/s | {r['preprocess_seconds']:.1f} s",
        ),
        (
            "preprocess peak RSS",
            f"largest process {mb(r['preprocess_peak_rss_single_mb'])}, "
            f"whole tree {mb(r['preprocess_peak_rss_tree_mb'])}",
        ),
        (
            f"random {r['window']}-token reads",
            f"{r['random_samples_per_s']:,.0f} samples/s | p50 {r['random_p50_us']:.1f} us | "
            f"p99 {r['random_p99_us']:.1f} us",
        ),
        (
            "sequential reads",
            f"{r['sequential_samples_per_s']:,.0f} samples/s | "
            f"{r['sequential_tokens_per_s'] / 1e6:,.0f} M tokens/s ({r['sequential_samples']:,} windows)",
        ),
        (
            "read peak RSS",
            f"{mb(r['read_peak_rss_mb'])} (at end: anonymous {mb(r['read_rss_anon_end_mb'])}, "
            f"file-backed mmap {mb(r['read_rss_file_end_mb'])})",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=512, help="JSONL corpus size in MB (10^6 bytes)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer", default="byte", choices=["byte", "hf", "sentencepiece"])
    ap.add_argument("--tokenizer-path")
    ap.add_argument("--window", type=int, default=2049, help="tokens per read sample (seq_len + 1)")
    ap.add_argument("--random-samples", type=int, default=20000)
    ap.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and dataset")
    ap.add_argument("--out", type=Path, default=Path("bench_data.json"))
    ap.add_argument("--read-only", metavar="PREFIX", help=argparse.SUPPRESS)  # the read phase's subprocess
    args = ap.parse_args(argv)
    if args.read_only:
        print(json.dumps(read_bench(args.read_only, args.window, args.random_samples, seed=0)))
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="megaeff-data-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus, prefix = workdir / "corpus.jsonl", workdir / "corpus_text_document"
    created = [corpus, Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), workdir / "preprocess_stats.json"]
    try:
        print(f"writing {args.size_mb:,.0f} MB corpus to {corpus}", file=sys.stderr, flush=True)
        result: Dict[str, object] = {
            "size_mb": args.size_mb,
            "workers": args.workers,
            "tokenizer": args.tokenizer,
            "window": args.window,
        }
        result.update(write_corpus(corpus, args.size_mb))
        result.update(run_preprocess(corpus, prefix, args))
        result.update(run_read(prefix, args))
    finally:
        if not args.keep:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                for path in created:
                    path.unlink(missing_ok=True)
    result["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    print(table(result))
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

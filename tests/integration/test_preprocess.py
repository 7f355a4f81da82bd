"""Preprocessing raw text into .bin/.idx: every document comes back exactly as the tokenizer encodes it, in input
order, for any worker count, input form, tokenizer and sharding; bad input stops with file:line and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from megaeff.data.corpus import load_plays
from megaeff.data.indexed import IndexedDataset, data_file_path, index_file_path
from megaeff.data.preprocess import InputError, merge_shards, preprocess, shard_prefix
from megaeff.data.tokenizer import build_tokenizer
from megaeff.errors import ConfigError
from tests.helpers import cli_env


def make_docs(n: int = 200):
    """n documents cut from the default corpus, of varied length, with non-ASCII text and one empty document."""
    plays = load_plays()
    text = "".join(plays[name][:8000] for name in sorted(plays)[:16])
    docs, pos = [], 0
    for i in range(n):
        size = 50 + (i * 37) % 700
        doc = text[pos : pos + size]
        pos += size
        if i % 9 == 3:
            doc = f"Ça va, {doc} — Größe 東京 🎭 naïve"
        docs.append(doc)
    assert all(docs)
    docs[17] = ""
    return docs


@pytest.fixture(scope="module")
def docs():
    return make_docs()


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, key: doc}, ensure_ascii=i % 2 == 0) + "\n")
    return path


def read_docs(prefix):
    ds = IndexedDataset(str(prefix))
    # One sequence per document.
    assert ds.document_indices.tolist() == list(range(len(ds) + 1))
    return [ds[i].tolist() for i in range(len(ds))]


def expected(tokenizer, docs, append_eod):
    out = [tokenizer.encode(d) + ([tokenizer.eod_id] if append_eod else []) for d in docs]
    return [ids for ids, d in zip(out, docs) if tokenizer.encode(d)]


def files_of(prefix):
    return data_file_path(prefix), index_file_path(prefix)


def same_bytes(a, b):
    return all(open(x, "rb").read() == open(y, "rb").read() for x, y in zip(files_of(a), files_of(b)))


@pytest.fixture(scope="module")
def tokenizers(docs, tmp_path_factory):
    """byte, plus a BPE (tokenizers) and a SentencePiece model trained here on the corpus."""
    import sentencepiece
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("tok")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        docs,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<eos>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bpe.save(str(root / "tokenizer.json"))
    (root / "sp.txt").write_text("\n".join(docs), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "sp.txt"), model_prefix=str(root / "sp"), vocab_size=200, model_type="unigram", minloglevel=2
    )
    return {
        "byte": build_tokenizer("byte"),
        "hf": build_tokenizer("hf", str(root / "tokenizer.json")),
        "sentencepiece": build_tokenizer("sentencepiece", str(root / "sp.model")),
    }


@pytest.mark.parametrize("kind, append_eod", [("byte", True), ("byte", False), ("hf", True), ("sentencepiece", True)])
def test_jsonl_round_trip_any_worker_count(tmp_path, docs, tokenizers, kind, append_eod):
    tok = tokenizers[kind]
    src = write_jsonl(tmp_path / "corpus.jsonl", docs)
    stats1 = preprocess([src], tmp_path / "w1", tok, workers=1, append_eod=append_eod)
    stats2 = preprocess([src], tmp_path / "w2", tok, workers=2, append_eod=append_eod)
    want = expected(tok, docs, append_eod)
    assert read_docs(tmp_path / "w1") == want
    assert same_bytes(tmp_path / "w1", tmp_path / "w2")
    assert IndexedDataset(str(tmp_path / "w1")).dtype == np.uint16  # every vocabulary here is small
    for stats in (stats1, stats2):
        assert stats["docs"] == len(docs) - 1 == len(want)
        assert stats["empty_docs"] == 1 and stats["bad_lines"] == 0
        assert stats["tokens"] == sum(map(len, want))
        assert stats["input_bytes"] == src.stat().st_size and stats["mb_per_s"] > 0
    assert stats2["outputs"] == [str(tmp_path / "w2")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "w1.bin", "w1.idx", "w2.bin", "w2.idx"]


def test_custom_json_key(tmp_path, docs, tokenizers):
    src = write_jsonl(tmp_path / "c.jsonl", docs[:20], key="content")
    preprocess([src], tmp_path / "out", tokenizers["byte"], json_key="content")
    assert read_docs(tmp_path / "out") == expected(tokenizers["byte"], docs[:20], False)


def test_plain_text_documents_lines_and_directories(tmp_path, docs, tokenizers):
    tok = tokenizers["hf"]
    texts = tmp_path / "texts"
    (texts / "b").mkdir(parents=True)
    (texts / "a.txt").write_text(docs[0], encoding="utf-8")
    (texts / "b" / "c.txt").write_text(docs[1], encoding="utf-8")
    (texts / "b" / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[2:6]) + "\n\n")
    (texts / "b" / "notes.md").write_text("not an input")  # other suffixes in a directory are ignored
    (texts / "a0.txt").write_text(docs[6], encoding="utf-8")

    preprocess([texts], tmp_path / "dir", tok, append_eod=True, workers=2)
    # Sorted paths: a.txt, a0.txt, b/c.txt, b/d.jsonl.
    assert read_docs(tmp_path / "dir") == expected(tok, [docs[0], docs[6], docs[1], *docs[2:6]], True)

    # A file given directly: plain text whatever its suffix, one document per file...
    preprocess([texts / "b" / "notes.md", texts / "a.txt"], tmp_path / "files", tok)
    assert read_docs(tmp_path / "files") == expected(tok, ["not an input", docs[0]], False)

    # ...or one per non-empty line, CRLF endings stripped.
    lines = ["First line, naïve 東京", "", "  ", "Second line", "Third\r"]
    (tmp_path / "lines.txt").write_bytes(
        ("\n".join(lines) + "\n").encode("utf-8").replace(b"Second line", b"Second line\r")
    )
    for workers in (1, 2):
        stats = preprocess(
            [tmp_path / "lines.txt"], tmp_path / f"lines{workers}", tok, text_mode="lines", workers=workers
        )
        assert read_docs(tmp_path / f"lines{workers}") == expected(
            tok, ["First line, naïve 東京", "Second line", "Third"], False
        )
        assert stats["docs"] == 3 and stats["empty_docs"] == 0
    assert same_bytes(tmp_path / "lines1", tmp_path / "lines2")


def test_contiguous_shards_merge_to_the_unsharded_dataset(tmp_path, docs, tokenizers):
    tok = tokenizers["byte"]
    # Two inputs so that shards cross a file boundary.
    srcs = [write_jsonl(tmp_path / "a.jsonl", docs[:120]), write_jsonl(tmp_path / "b.jsonl", docs[120:])]
    preprocess(srcs, tmp_path / "full", tok, append_eod=True)
    stats = preprocess(srcs, tmp_path / "sh", tok, append_eod=True, num_shards=3, workers=2)
    shards = [shard_prefix(tmp_path / "sh", i, 3) for i in range(3)]
    assert stats["outputs"] == shards and all(n > 20 for n in stats["shard_docs"])
    assert sum(stats["shard_docs"]) == stats["docs"] == len(docs) - 1
    assert sum((read_docs(p) for p in shards), []) == read_docs(tmp_path / "full")

    merged = merge_shards(shards, tmp_path / "merged")
    assert merged["docs"] == len(docs) - 1 and merged["shards"] == 3
    assert same_bytes(tmp_path / "merged", tmp_path / "full")

    # --merge in one go: the shards are intermediate and removed.
    preprocess(srcs, tmp_path / "one", tok, append_eod=True, num_shards=4, merge=True)
    assert same_bytes(tmp_path / "one", tmp_path / "full")
    assert not list(tmp_path.glob("one_shard*"))


def test_round_robin_shards(tmp_path, docs, tokenizers):
    tok = tokenizers["byte"]
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    preprocess([src], tmp_path / "rr", tok, num_shards=3, shard_mode="round-robin", workers=2)
    want = expected(tok, docs, False)
    for i in range(3):
        assert read_docs(shard_prefix(tmp_path / "rr", i, 3)) == want[i::3]


BAD_LINES = [
    ('{"text": "fine"', "not valid JSON"),
    ('{"body": "no text key"}', "no key 'text'"),
    ('["an", "array"]', "expected a JSON object, got an array"),
    ('{"text": 42}', "'text' is a number, not a string"),
    (b'{"text": "\xff\xfe"}', "not valid UTF-8"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES)
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_names_file_and_line_and_writes_nothing(tmp_path, docs, tokenizers, bad, message, workers):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": d}).encode() for d in docs[:300]]
    lines.insert(6, b"")  # blank lines are skipped but still counted in line numbers
    lines.insert(150, bad if isinstance(bad, bytes) else bad.encode())
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError) as exc:
        preprocess([src], out / "ds", tokenizers["byte"], workers=workers, append_eod=True)
    assert str(exc.value).startswith(f"{src}:151: {message}")
    assert (exc.value.path, exc.value.line) == (str(src), 151)
    assert list(out.iterdir()) == []


def test_failed_run_keeps_the_previous_output(tmp_path, docs, tokenizers):
    good = write_jsonl(tmp_path / "good.jsonl", docs[:10])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnope\n')
    preprocess([good], tmp_path / "ds", tokenizers["byte"])
    before = [open(p, "rb").read() for p in files_of(tmp_path / "ds")]
    with pytest.raises(InputError, match=r"bad\.jsonl:2: not valid JSON"):
        preprocess([good, bad], tmp_path / "ds", tokenizers["byte"], num_shards=2)
    assert [open(p, "rb").read() for p in files_of(tmp_path / "ds")] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "ds.bin", "ds.idx", "good.jsonl"]


def test_skip_bad_lines_counts_them(tmp_path, docs, tokenizers):
    src = tmp_path / "in.jsonl"
    good = [json.dumps({"text": d}) for d in docs[:40]]
    lines = good[:10] + [b.decode() if isinstance(b, bytes) else b for b in ('{"text": "fine"', '["x"]')] + good[10:]
    lines.insert(30, '{"other": 1}')
    src.write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        stats = preprocess([src], tmp_path / f"out{workers}", tokenizers["byte"], skip_bad_lines=True, workers=workers)
        assert stats["bad_lines"] == 3
        assert stats["empty_docs"] == 1 and stats["docs"] == 39
        assert read_docs(tmp_path / f"out{workers}") == expected(tokenizers["byte"], docs[:40], False)


def test_empty_inputs(tmp_path, docs, tokenizers):
    good = write_jsonl(tmp_path / "good.jsonl", docs[:5])
    (tmp_path / "empty.jsonl").write_text("\n\n")  # only blank lines: no documents
    (tmp_path / "empty.txt").write_text("")
    for name in ("empty.jsonl", "empty.txt"):
        with pytest.raises(InputError, match="empty input file") as exc:
            preprocess([good, tmp_path / name], tmp_path / "out", tokenizers["byte"], workers=2)
        assert exc.value.path == str(tmp_path / name)
        assert not list(tmp_path.glob("out*"))
    stats = preprocess(
        [good, tmp_path / "empty.jsonl", tmp_path / "empty.txt"], tmp_path / "out", tokenizers["byte"], allow_empty=True
    )
    assert stats["empty_files"] == 2 and stats["docs"] == 5
    (tmp_path / "nothing").mkdir()
    with pytest.raises(InputError, match=r"nothing: directory has no \*\.jsonl, \*\.json, \*\.txt files"):
        preprocess([tmp_path / "nothing"], tmp_path / "x", tokenizers["byte"])
    with pytest.raises(InputError, match="no such file or directory"):
        preprocess([tmp_path / "missing.jsonl"], tmp_path / "x", tokenizers["byte"])


def test_append_eod_needs_an_eos_token(tmp_path, docs):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    no_eos = build_tokenizer("hf", str(tmp_path / "tokenizer.json"))
    src = write_jsonl(tmp_path / "c.jsonl", docs[:5])
    with pytest.raises(ConfigError, match="no end-of-sequence token"):
        preprocess([src], tmp_path / "out", no_eos, append_eod=True)
    assert not list(tmp_path.glob("out*"))
    assert preprocess([src], tmp_path / "out", no_eos)["docs"] == 5  # fine without EOD


def cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "megaeff.cli.preprocess_data", *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=cwd,
        timeout=120,
    )


def test_cli(tmp_path, docs, tokenizers):
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    proc = cli(
        "--input",
        src,
        "--output-prefix",
        tmp_path / "ds",
        "--append-eod",
        "--workers",
        "2",
        "--log-interval",
        "0",
        "--stats-json",
        tmp_path / "stats.json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MB/s" in proc.stdout and "199 docs" in proc.stdout and "1 empty doc(s)" in proc.stdout
    assert "docs/s" in proc.stderr  # progress lines
    assert read_docs(tmp_path / "ds") == expected(tokenizers["byte"], docs, True)
    assert json.loads((tmp_path / "stats.json").read_text())["docs"] == 199

    proc = cli(
        "--input", src, "--output-prefix", tmp_path / "sh", "--append-eod", "--num-shards", "2", "--quiet", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    proc = cli(
        "--merge-shards",
        tmp_path / "sh_shard0of2",
        tmp_path / "sh_shard1of2",
        "--output-prefix",
        tmp_path / "merged",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "merged 2 shard(s): 199 docs" in proc.stdout
    assert same_bytes(tmp_path / "merged", tmp_path / "ds")


def test_cli_bad_input_exit_2_without_traceback(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{not json}\n')
    proc = cli("--input", "bad.jsonl", "--output-prefix", "out/ds", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "megaeff: error: bad.jsonl:3: not valid JSON: Expecting property name enclosed in double quotes at "
        "column 2; --skip-bad-lines skips such records"
    ]
    assert not list((tmp_path / "out").iterdir())
    for args, fragment in [
        (["--input", "missing.jsonl", "--output-prefix", "x"], "megaeff: error: missing.jsonl: no such file"),
        (["--input", "bad.jsonl", "--output-prefix", "x", "--tokenizer", "hf"], "needs a path"),
        (
            ["--input", "bad.jsonl", "--output-prefix", "x", "--tokenizer", "hf", "--tokenizer-path", "nope.json"],
            "nope.json: no such file or directory",
        ),
        (["--output-prefix", "x"], "megaeff: error: give either --input or --merge-shards"),
        (["--merge-shards", "nope", "--output-prefix", "x"], "nope.bin: shard file not found"),
    ]:
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

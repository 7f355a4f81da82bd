"""Training on Megatron-format datasets: blending, exact resume (also onto another data-parallel degree), errors."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from megaeff.data.builder import BuildContext, build_data
from megaeff.data.corpus import load_plays
from megaeff.data.indexed import IndexedDatasetBuilder
from megaeff.data.sampler import GlobalSampleOrder, micro_batch_indices
from megaeff.data.tokenizer import ByteTokenizer
from megaeff.distributed.dims import ParallelDims
from megaeff.errors import DataError
from megaeff.train.trainer import Trainer
from tests.helpers import PYTHON, cli_env


def write_plays(prefix, names, max_bytes=60_000, dtype=np.uint16):
    tok, plays = ByteTokenizer(), load_plays()
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for n in names:
        b.add_document(np.append(tok.encode_array(plays[n][:max_bytes]), tok.eod_id))
    b.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    comedies = [
        "as-you-like-it",
        "much-ado-about-nothing",
        "twelfth-night",
        "the-comedy-of-errors",
        "love-s-labours-lost",
    ]
    tragedies = ["hamlet", "macbeth", "othello", "king-lear", "romeo-and-juliet"]
    return write_plays(root / "comedies", comedies), write_plays(root / "tragedies", tragedies)


def indexed_overrides(two_corpora, *extra):
    a, b = two_corpora
    return [
        "data=indexed",
        f"data.paths=[0.3,{a},0.7,{b}]",
        "data.split='4,1,0'",
        "data.seq_len=32",
        "model.vocab_size=264",
        "model.max_seq_len=64",
        *extra,
    ]


def make_trainer(cfg):
    return Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), cfg.run_dir)


def test_blended_run_and_bit_exact_resume(tmp_path, smoke_cfg, two_corpora):
    full = make_trainer(smoke_cfg(tmp_path / "full", *indexed_overrides(two_corpora)))
    assert "0.3 x" in full.data.description and "0.7 x" in full.data.description
    ref = full.fit()
    full.close()
    assert np.isfinite(ref.losses).all() and ref.final_eval["val_tokens"] > 0

    cfg = smoke_cfg(tmp_path / "split", *indexed_overrides(two_corpora, "train.exit_interval=4"))
    first = make_trainer(cfg)
    part1 = first.fit()
    first.close()
    second = make_trainer(cfg)
    part2 = second.fit()
    second.close()
    assert part1.losses + part2.losses == ref.losses
    assert part2.final_eval == ref.final_eval


def test_resume_on_another_dp_degree_reads_the_same_samples(tmp_path, smoke_cfg, two_corpora):
    """Sample by sample: steps 5-8 after a resume at step 4 read the same samples whether the second half runs on
    1, 2 or 4 data-parallel ranks (ranks simulated in one process from the same global order)."""
    cfg = smoke_cfg(tmp_path, *indexed_overrides(two_corpora))
    global_batch, steps = 8, 8
    ctx = BuildContext(steps * global_batch, cfg.train.seed, True, lambda: None)
    data = build_data(cfg.data, ctx)
    order = GlobalSampleOrder(len(data.train), cfg.train.seed, shuffle=False)

    def step_tokens(consumed, micro, dp, accum):
        per_rank = [micro_batch_indices(order, consumed, micro, dp, r, accum) for r in range(dp)]
        idx = sorted(i for rank in per_rank for mb in rank for i in mb)
        return torch.cat([data.train.batch([i])["inputs"] for i in idx])

    uninterrupted = [step_tokens(s * global_batch, 8, 1, 1) for s in range(steps)]
    consumed_at_resume = 4 * global_batch  # what the checkpoint stores
    for micro, dp, accum in [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 4, 2), (2, 4, 1)]:
        resumed = [step_tokens(consumed_at_resume + s * global_batch, micro, dp, accum) for s in range(steps - 4)]
        for a, b in zip(resumed, uninterrupted[4:]):
            assert torch.equal(a, b), (micro, dp, accum)


def test_token_outside_the_model_vocabulary_is_reported(tmp_path, smoke_cfg):
    prefix = tmp_path / "big"
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for _ in range(20):
        b.add_document(np.arange(100) + 250)  # ids up to 349 > vocab 264
    b.finalize(f"{prefix}.idx")
    cfg = smoke_cfg(tmp_path / "run", "data=indexed", f"data.paths=[{prefix}]", "data.seq_len=32", "data.split='9,1,0'")
    tr = make_trainer(cfg)
    with pytest.raises(DataError, match="outside model.vocab_size=264"):
        tr.fit()
    tr.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, fragments",
    [
        (
            "data.paths=[/nonexistent/corpus]",
            ["megaeff: error: data '/nonexistent/corpus'", "no /nonexistent/corpus.bin"],
        ),
        ("data.paths=[0.5,a,b]", ["megaeff: error: data 'data.paths'", "odd number"]),
        ("data.paths=[heavy,a,0.5,b]", ["megaeff: error: data 'data.paths'", "'heavy'", "not a number"]),
        ("data.split='9,x'", ["data.split", "not a comma-separated list"]),
    ],
)
def test_bad_indexed_config_is_one_clear_message(tmp_path, two_corpora, override, fragments):
    a, _ = two_corpora
    args = ["data=indexed", f"data.paths=[{a}]", "model.vocab_size=264", "data.seq_len=32", override]
    proc = subprocess.run(
        [PYTHON, "-m", "megaeff.train", "experiment=smoke", f"run_dir={tmp_path}", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    for frag in fragments:
        assert frag in out, out

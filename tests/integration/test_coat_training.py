"""precision=coat end to end: the loss tracks an FP32 run while optimizer states and saved activations shrink."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import compose

from megaeff.distributed.dims import ParallelDims
from megaeff.train.trainer import Trainer

SHORT_RUN = ["train.steps=100", "train.micro_batch_size=8", "data.seq_len=128", "train.eval_interval=0",
             "train.eval_max_batches=16", "train.ckpt_interval=0", "train.plot=false", "optim.warmup_steps=10",
             "logging.progress=false", "train.threads=1"]


def train(run_dir: Path, *overrides):
    cfg = compose([*SHORT_RUN, f"run_dir={run_dir}", *overrides])
    trainer = Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), run_dir)
    result = trainer.fit()
    trainer.close()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    return result.final_eval["val_loss"], last


@pytest.mark.slow
def test_coat_loss_within_one_percent_of_fp32_with_less_memory(tmp_path):
    fp32_loss, fp32 = train(tmp_path / "fp32", "precision=fp32")
    coat_loss, coat = train(tmp_path / "coat", "precision=coat")
    assert abs(coat_loss - fp32_loss) / fp32_loss < 0.01, (coat_loss, fp32_loss)
    # FP8 moments: ~2.2 bytes per parameter instead of 8.
    assert fp32["mem_optim_bytes"] / coat["mem_optim_bytes"] > 3.5
    # Activations saved for backward: FP8 linear inputs, norms and SwiGLU products; attention stays FP32.
    assert fp32["act_saved_bytes"] / coat["act_saved_bytes"] > 2.0

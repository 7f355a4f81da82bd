"""precision=coat end to end: the loss tracks an FP32 run while optimizer states and saved activations shrink."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from megaeff.distributed.dims import ParallelDims
from megaeff.train.trainer import Trainer
from tests.helpers import PYTHON, cli_env, compose

SHORT_RUN = [
    "train.steps=100",
    "train.micro_batch_size=8",
    "data.seq_len=128",
    "train.eval_interval=0",
    "train.eval_max_batches=16",
    "train.ckpt_interval=0",
    "train.plot=false",
    "optim.warmup_steps=10",
    "logging.progress=false",
    "train.threads=1",
]


def records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(run_dir: Path, *overrides):
    cfg = compose([*SHORT_RUN, f"run_dir={run_dir}", *overrides])
    trainer = Trainer(cfg, ParallelDims.from_config(cfg.parallel, 1), run_dir)
    result = trainer.fit()
    trainer.close()
    last = [r for r in records(run_dir) if r["kind"] == "train"][-1]
    return result.final_eval["val_loss"], last


def train_in_background(run_dir: Path, *overrides) -> subprocess.Popen:
    """The same run through the CLI in another process: both runs use one thread, so on CI's two cores they take
    the time of one (the FP32 reference is the CLI's run, the COAT run the in-process Trainer's)."""
    args = [*SHORT_RUN, f"run_dir={run_dir}", *overrides]
    return subprocess.Popen(
        [PYTHON, "-m", "megaeff.train", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=cli_env()
    )


@pytest.mark.slow
def test_coat_loss_within_one_percent_of_fp32_with_less_memory(tmp_path):
    reference = train_in_background(tmp_path / "fp32", "precision=fp32")
    coat_loss, coat = train(tmp_path / "coat", "precision=coat")
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-3000:]
    fp32_records = records(tmp_path / "fp32")
    fp32 = [r for r in fp32_records if r["kind"] == "train"][-1]
    fp32_loss = [r for r in fp32_records if r["kind"] == "eval"][-1]["val_loss"]
    # Measured val loss: FP32 2.5485, COAT 2.5580 (0.37% off); COAT without Adam's bias correction 2.5807 (1.26%,
    # fails), an untrained model ln(257) = 5.55. The per-step tracking bound is derived in
    # tests/unit/test_coat_adamw.py.
    assert abs(coat_loss - fp32_loss) / fp32_loss < 0.01, (coat_loss, fp32_loss)
    # FP8 moments: 2 bytes of codes + 24 bytes of metadata per 128-wide group + an int64 step per matrix, FP32 moments
    # for the 9 norm gains; exactly 1,916,600 B against FP32 AdamW's 8 B per parameter + a float step per tensor
    # (6,972,572 B): 3.638x. Metadata per 64-wide group would give 3.35x, BF16 first moments 2.50x.
    assert fp32["mem_optim_bytes"] / coat["mem_optim_bytes"] > 3.5
    # Activations saved for backward: FP8 linear inputs, norms and SwiGLU products; attention stays FP32. The same
    # tiny LLaMA as tests/unit/test_fp8_activations.py, and the same 2.517x (measured 46,813,188 / 18,600,004 B);
    # its 10% slack. Codes kept two bytes wide would give 1.83x, which the old `> 2.0` rejected too, with less room.
    assert fp32["act_saved_bytes"] / coat["act_saved_bytes"] > 0.9 * 2.517

"""FSSDP end to end (`parallel.dp_impl=fssdp`): the trainer with sharded compact parameters, gradients and
optimizer state reproduces the single-process run (per-step losses over 10 steps, validation losses, final
parameters; float32, relative 1e-5) at dp=4 and composed as tp2 x pp2 x dp2 on 8 ranks; its checkpoints are the
single-process files in both directions; bad FSSDP configs name their field. The layer-level proofs (every
method, AdamW and COAT, bytes, resharding, bf16/FP8 gathers) are in test_fssdp.py."""

from __future__ import annotations

import pytest

from megaeff.config.validate import validate_config
from megaeff.errors import ConfigError
from tests.helpers import assert_same_run, compose, records, train

pytestmark = pytest.mark.slow

STEPS = 10
# eps 1e-6: AdamW divides by sqrt(v) + eps, and with 1e-8 the last-bit differences of another summation order
# grow where a gradient element nearly cancels (test_fssdp.py measures it).
COMMON = [
    "experiment=smoke",
    "model.n_layers=4",
    "method.rank=8",
    "method.sltrain_costs=fixed",  # SLTrain: the same paths in every layout (measured costs differ per shard shape)
    "optim.eps=1e-6",
    f"train.steps={STEPS}",
    "train.log_interval=1",
    "train.eval_interval=5",
    "train.plot=false",
    "optim.warmup_steps=2",
    f"train.ckpt_interval={STEPS}",
    "train.grad_accum=2",
]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    runs = {}

    def get(method, *extra):
        key = (method, *extra)
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("single") / method
            train(runs[key], *COMMON, f"method={method}", *extra, "train.micro_batch_size=4")
        return runs[key]

    return get


# The tiny model's widths (the smoke model's 32 are too narrow: many of its factors hold fewer 128-element
# groups than there are ranks and stay replicated).
WIDE = ["model.dim=128", "model.ffn_dim=352", "model.n_heads=4"]


def test_dp4_matches_single_process_with_a_quarter_of_the_state(single, tmp_path):
    out = train(
        tmp_path / "run",
        *COMMON,
        *WIDE,
        "method=lost",
        "parallel.dp=4",
        "parallel.dp_impl=fssdp",
        "train.micro_batch_size=1",
        nproc=4,
    )
    assert "fssdp: " in out
    assert_same_run(single("lost", *WIDE), tmp_path / "run", STEPS)
    ref, got = records(single("lost", *WIDE))[0], records(tmp_path / "run")[0]
    # Shards of whole groups, uneven and padded: about a quarter per rank, plus the replicated norm gains.
    for key in ("mem_params_bytes", "mem_grads_bytes", "mem_optim_bytes"):
        assert got[key] < 0.3 * ref[key], key
    assert got["comm_bytes/dp_cp/all_gather"] > 0 and got["comm_bytes/dp_cp/reduce_scatter"] > 0


def test_tp2_pp2_dp2_on_eight_ranks(single, tmp_path):
    train(
        tmp_path / "run",
        *COMMON,
        "method=sltrain",
        "parallel=tp2_pp2_dp2",
        "parallel.dp_impl=fssdp",
        "train.micro_batch_size=2",
        nproc=8,
    )
    assert_same_run(single("sltrain"), tmp_path / "run", STEPS)


def test_checkpoints_are_the_single_process_files(single, tmp_path):
    """Steps 1-5 under FSSDP (dp=2), 6-10 in one process: the uninterrupted run, through the CLI. (Loading into
    FSSDP shards from other layouts is covered by tests/distributed/test_dcp_checkpoint.py on a RankPool.)"""
    a = tmp_path / "fssdp_then_single"
    fssdp = ["parallel=dp2", "parallel.dp_impl=fssdp", "train.micro_batch_size=2"]
    train(a, *COMMON, "method=lost", *fssdp, "train.exit_interval=5", nproc=2, expect=1)  # torchrun: 75 -> 1
    train(a, *COMMON, "method=lost", "train.micro_batch_size=4")
    assert_same_run(single("lost"), a, STEPS)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["parallel.dp_impl=zero3"], "parallel.dp_impl"),
        (["parallel.dp_impl=fssdp", "parallel.fssdp_gather_dtype=fp16"], "parallel.fssdp_gather_dtype"),
        (["parallel.dp_impl=fssdp", "parallel.fssdp_reduce_dtype=fp8"], "parallel.fssdp_reduce_dtype"),
        (["parallel.dp_impl=fssdp", "train.activation_checkpointing=true"], "train.activation_checkpointing"),
    ],
)
def test_bad_fssdp_configs(overrides, field):
    with pytest.raises(ConfigError) as exc:
        validate_config(compose([*COMMON, "parallel=dp2", *overrides]), world_size=2)
    assert exc.value.field == field

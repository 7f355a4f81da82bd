"""`megaeff-estimate-memory --measure`: the peak of one training step on fake tensors, from the command line."""

from __future__ import annotations

import json

import pytest

from megaeff.cli.estimate_memory import main

SMALL = ["--model", "tiny", "--set", "train.micro_batch_size=1", "--set", "data.seq_len=32"]


def test_measure_json(capsys):
    assert main(["--measure", *SMALL, "--method", "lost", "--set", "precision=coat", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["preset"] == "lost" and row["precision"] == "coat"
    assert row["peak_bytes"] == sum(row["breakdown"].values()) > 0
    assert row["peak_gb"] == row["peak_bytes"] / 1e9
    assert row["phase"] in {"forward", "backward", "clip", "optimizer", "between_microbatches"}


def test_measure_table_names_the_peak_and_the_rank(capsys):
    assert main(["--measure", *SMALL, "--set", "parallel.tp=2", "--rank", "1"]) == 0
    out = capsys.readouterr().out
    assert "rank 1 (tp=2 cp=1 dp=1 pp=1)" in out
    assert " GB (" in out and "GiB" in out and "activations saved for backward" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--rank", "2"], "--rank 2 is outside"),
        (["--set", "parallel.tp=3"], "parallel.tp=3"),
        (["--method", "dense", "--method", "lost"], "one --method"),
        (["--paper-formula"], "--paper-formula"),
        (["--set", "train.micro_batch_size=0"], "train.micro_batch_size"),
    ],
)
def test_measure_bad_input_is_one_line_exit_2(capsys, args, needle):
    assert main(["--measure", *SMALL, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megaeff-estimate-memory: error:") and needle in err and "\n" not in err

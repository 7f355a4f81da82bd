"""`megaeff-estimate-memory`: parameter counts and training-state bytes on the meta device."""

from __future__ import annotations

import json

import pytest

from megaeff.cli.estimate_memory import default_methods, main

# llama_60m, vocab 32000: exact parameter counts and the rounded published figures.
EXACT_60M = {
    "dense": (58_073_600, "58.07M"),
    "lowrank_60m": (42_770_944, "42.77M"),
    "sltrain_60m": (43_529_832, "43.53M"),
    "lost_60m": (44_009_472, "44.01M"),
}
NNZ_60M = 758_888  # 0.76M
LOST_60M_CHANNELS = 8 * (4 * 25 + 2 * 25 + 68)
LINEARS_60M = 8 * 7


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_default_methods_follow_the_model_size():
    assert default_methods("llama_60m") == ["dense", "lowrank_60m", "sltrain_60m", "lost_60m"]
    assert default_methods("tiny") == ["dense", "lowrank", "sltrain", "lost"]


def test_table_for_llama_60m_has_exact_numbers(capsys):
    rc, out, _ = run(capsys, "--model", "llama_60m")
    assert rc == 0
    for preset, (exact, rounded) in EXACT_60M.items():
        line = next(line for line in out.splitlines() if line.startswith(preset + " "))
        assert rounded in line and f"{exact:,}" in line, line
    sl = next(line for line in out.splitlines() if line.startswith("sltrain_60m "))
    assert "0.76M" in sl and "3.04 MB" in sl  # int32 support: 4 bytes per nonzero
    assert "sparse below" in out and "25 channels" in out and "68 channels" in out  # per-shape details


def test_json_bytes_are_exact_for_each_method(capsys):
    rc, out, _ = run(capsys, "--model", "llama_60m", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["settings"] == {
        "param_dtype": "fp32",
        "grad_dtype": "fp32",
        "state_dtype": "fp32",
        "index_dtype": "int32",
    }
    rows = {r["preset"]: r for r in data["rows"]}
    assert set(rows) == set(EXACT_60M)
    tensors = {
        "dense": 2 + 17 + LINEARS_60M,
        "lowrank_60m": 19 + 2 * LINEARS_60M,
        "sltrain_60m": 19 + 3 * LINEARS_60M,
        "lost_60m": 19 + 3 * LINEARS_60M,
    }
    index = {
        "dense": 0,
        "lowrank_60m": 0,
        "sltrain_60m": 4 * NNZ_60M + 8 * LINEARS_60M,
        "lost_60m": 4 * LOST_60M_CHANNELS + 8 * LINEARS_60M,
    }
    for preset, (exact, _) in EXACT_60M.items():
        r = rows[preset]
        assert r["params"] == r["trainable_params"] == exact
        assert r["mem_params_bytes"] == r["mem_grads_bytes"] == 4 * exact
        assert r["mem_optim_bytes"] == 8 * exact + 4 * tensors[preset]  # exp_avg, exp_avg_sq, fp32 step per tensor
        assert r["mem_index_bytes"] == index[preset]
        assert r["mem_total_bytes"] == 16 * exact + 4 * tensors[preset] + index[preset]
        assert r["dense_params"] == 58_073_600
        assert r["bytes_per_dense_param"] == pytest.approx(r["mem_total_bytes"] / 58_073_600)
    assert rows["sltrain_60m"]["nnz"] == rows["sltrain_60m"]["index_entries"] == NNZ_60M
    assert rows["lost_60m"]["index_entries"] == LOST_60M_CHANNELS


def test_paper_formula_reproduces_sltrain_figure_at_1b(capsys):
    """SLTrain's estimate (2 B per weight, 4 B of Adam state per trainable weight, 8 B per index): Fig. 1 puts
    LLaMA-1B at full rank 8.03 GB, low-rank 3.66 GB, SLTrain 4.16 GB."""
    rc, out, _ = run(
        capsys,
        "--model",
        "llama_1b",
        "--paper-formula",
        "--method",
        "dense",
        "--method",
        "lowrank_1b",
        "--method",
        "sltrain_1b",
        "--json",
    )
    assert rc == 0
    rows = {r["preset"]: r for r in json.loads(out)["rows"]}
    assert {k: round(r["mem_total_bytes"] / 1e9, 2) for k, r in rows.items()} == {
        "dense": 8.03,
        "lowrank_1b": 3.66,
        "sltrain_1b": 4.16,
    }
    assert rows["sltrain_1b"]["nnz"] == 36_237_240 and rows["sltrain_1b"]["mem_grads_bytes"] == 0


def test_overrides_and_dtypes(capsys):
    rc, out, _ = run(
        capsys,
        "--model",
        "llama_60m",
        "--method",
        "sltrain_60m",
        "--set",
        "method.density=0.05",
        "--state-dtype",
        "bf16",
        "--index-dtype",
        "int64",
        "--json",
    )
    assert rc == 0
    r = json.loads(out)["rows"][0]
    nnz = 8 * (4 * 13107 + 3 * 35225)  # floor(0.05 * 512 * 512), floor(0.05 * 512 * 1376)
    assert r["nnz"] == nnz and r["mem_index_bytes"] == 8 * nnz + 8 * LINEARS_60M
    assert r["mem_optim_bytes"] == 4 * r["params"] + 4 * (19 + 3 * LINEARS_60M)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", "llama_nope"], "llama_nope"),
        (["--model", "tiny", "--method", "sltrain_7b"], "method.rank"),
    ],
)
def test_errors_are_one_line_with_exit_2(capsys, argv, needle):
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and needle in err and err.startswith("megaeff-estimate-memory: error:")

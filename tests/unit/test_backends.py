"""The backend report (megaeff/train/backends.py): its entries, the used/not-used decision with its reason, and the
JSON a run writes into its run directory. CPU only and fast; the accelerators themselves are exercised by
tests/gpu/test_accelerators.py where they exist."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megaeff.distributed.dims import ParallelDims
from megaeff.train import backends
from megaeff.train.backends import Found, Usage, build_report, probe

NAMES = [
    "flash_attn",
    "apex.fused_rmsnorm",
    "apex.multi_tensor_adam",
    "apex.grad_accum_fusion",
    "triton",
    "csrc.fp8_adamw_cuda",
    "csrc.fp8_adamw_cpu",
    "torch.compile",
    "fp8_gemm",
]


def usage(**over) -> Usage:
    base = dict(
        device="cuda:0",
        attention="flash",
        optim_impl="fused",
        fp8_kernel=None,
        fp8_gemm=False,
        compile=None,
        default_activation_ops=True,
    )
    return Usage(**{**base, **over})


def everything_found() -> dict:
    return {name: Found(True, "1.0") for name in NAMES}


def test_probe_on_cpu_names_every_backend_and_why_missing():
    found = probe("cpu")
    assert list(found) == NAMES
    for name, f in found.items():
        assert f.found or f.reason, name  # a missing backend always says why
    assert found["flash_attn"].found == (importlib.util.find_spec("flash_attn") is not None)
    assert found["triton"].found == (importlib.util.find_spec("triton") is not None)
    if importlib.util.find_spec("apex") is None:
        assert all("apex is not importable" in found[n].reason for n in NAMES if n.startswith("apex."))
    if not torch.cuda.is_available():
        assert not found["csrc.fp8_adamw_cuda"].found or "CUDA" in found["csrc.fp8_adamw_cuda"].reason


def test_report_on_a_full_cuda_machine_marks_what_the_run_chose():
    r = build_report(usage(fp8_kernel="cuda", fp8_gemm=True, compile=True), everything_found())
    used = {e.name for e in r.entries if e.used}
    assert used == {
        "flash_attn",
        "csrc.fp8_adamw_cuda",
        "torch.compile",
        "fp8_gemm",
        "triton",  # inductor's kernels on CUDA
    }
    # Under compile the fused RMSNorm gives way to inductor; fused AdamW is torch's unless optim.impl=apex.
    assert "inductor" in r.entry("apex.fused_rmsnorm").reason
    assert "optim.impl=apex" in r.entry("apex.multi_tensor_adam").reason
    assert "precision.grad_accum_fusion=false" in r.entry("apex.grad_accum_fusion").reason
    assert "COAT's FP8 AdamW kernel is cuda" in r.entry("csrc.fp8_adamw_cpu").reason


def test_apex_parts_are_used_where_they_apply():
    r = build_report(usage(optim_impl="apex"), everything_found())
    assert r.entry("apex.fused_rmsnorm").used and r.entry("apex.multi_tensor_adam").used
    r = build_report(usage(default_activation_ops=False), everything_found())
    assert not r.entry("apex.fused_rmsnorm").used and "FP8" in r.entry("apex.fused_rmsnorm").reason
    r = build_report(usage(device="cpu", attention="sdpa"), everything_found())
    assert not r.entry("apex.fused_rmsnorm").used and not r.entry("flash_attn").used
    assert "CUDA" in r.entry("flash_attn").reason


def test_grad_accum_fusion_entry_names_the_kernel_or_the_torch_fallback(monkeypatch):
    monkeypatch.delenv("MEGAEFF_DISABLE_APEX", raising=False)
    entry = build_report(usage(grad_accum_fusion=True), everything_found()).entry("apex.grad_accum_fusion")
    assert entry.used and "main_grad" in entry.reason
    cpu = usage(grad_accum_fusion=True, device="cpu")
    entry = build_report(cpu, everything_found()).entry("apex.grad_accum_fusion")
    assert not entry.used and "torch fallback" in entry.reason
    found = {**everything_found(), "apex.grad_accum_fusion": Found(False, reason="apex is not importable")}
    entry = build_report(usage(grad_accum_fusion=True), found).entry("apex.grad_accum_fusion")
    assert not entry.used and "apex is not importable" in entry.reason and "torch fallback" in entry.reason
    monkeypatch.setenv("MEGAEFF_DISABLE_APEX", "1")
    entry = build_report(usage(grad_accum_fusion=True), everything_found()).entry("apex.grad_accum_fusion")
    assert not entry.used and "torch fallback" in entry.reason


def test_a_missing_backend_is_never_used_and_its_reason_is_why_it_is_missing():
    found = everything_found()
    found["flash_attn"] = Found(False, reason="flash_attn is not installed")
    found["csrc.fp8_adamw_cuda"] = Found(False, reason="not built")
    r = build_report(usage(fp8_kernel="cuda"), found)
    assert (r.entry("flash_attn").used, r.entry("flash_attn").reason) == (False, "flash_attn is not installed")
    assert (r.entry("csrc.fp8_adamw_cuda").used, r.entry("csrc.fp8_adamw_cuda").reason) == (False, "not built")


def test_compile_entry_reads_the_config_field_when_it_exists():
    assert (
        build_report(usage(compile=None), everything_found()).entry("torch.compile").reason.startswith("not requested")
    )
    assert not build_report(usage(compile=False), everything_found()).entry("torch.compile").used
    assert build_report(usage(compile=True), everything_found()).entry("torch.compile").used


def test_report_serializes_with_every_field(tmp_path):
    r = build_report(usage(), everything_found())
    path = backends.write_report(r, tmp_path)
    data = json.loads(path.read_text())
    assert data["device"] == "cuda:0" and data["torch"] == torch.__version__
    assert [e["name"] for e in data["backends"]] == NAMES
    for e in data["backends"]:
        assert set(e) == {"name", "found", "version", "used", "reason"}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_run_prints_the_report_once_and_writes_it_to_the_run_dir(tmp_path, smoke_cfg, capsys):
    from megaeff.train.trainer import Trainer

    cfg = smoke_cfg(tmp_path / "run", "optim=coat_adamw", "train.ckpt_interval=0")
    trainer = Trainer(cfg, ParallelDims.from_config(cfg.parallel, world_size=1), Path(cfg.run_dir))
    trainer.close()
    out = capsys.readouterr().out
    assert out.count("backends (device cpu") == 1
    data = json.loads((tmp_path / "run" / backends.REPORT_FILE).read_text())
    entries = {e["name"]: e for e in data["backends"]}
    # COAT on CPU: the FP8 AdamW kernel auto-selects the C++ kernel (a C++ compiler is part of the test setup).
    assert entries["csrc.fp8_adamw_cpu"]["used"]
    assert "COAT's FP8 AdamW kernel" in entries["csrc.fp8_adamw_cpu"]["reason"]
    assert not entries["csrc.fp8_adamw_cuda"]["used"]
    assert entries["flash_attn"]["used"] is False and entries["flash_attn"]["reason"]
    for e in entries.values():
        print(f"{e['name']}: used={e['used']} ({e['reason']})")


@pytest.mark.parametrize("bad", ["nope"])
def test_unknown_entry_is_an_error(bad):
    with pytest.raises(KeyError, match=bad):
        build_report(usage(), {bad: Found(True)})


# ------------------------------------------------------------------------------------------ apex on this machine
def test_optim_impl_apex_is_refused_with_the_reason_where_it_cannot_run():
    from megaeff.config.optim import OptimConfig
    from megaeff.errors import ConfigError
    from megaeff.optim.builder import build_optimizer

    model = torch.nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="optim.impl") as exc:
        build_optimizer(model, OptimConfig(impl="apex"), torch.device("cpu"))
    assert "CUDA tensors" in str(exc.value)


def test_rmsnorm_falls_back_to_the_formula_off_cuda():
    from megaeff.layers import apex_ops
    from megaeff.layers.norm import RMSNorm
    from megaeff.layers.ops import HIGH_PRECISION

    norm = RMSNorm(8)
    norm.init_weights()
    x = torch.randn(3, 8)
    assert apex_ops.fused_rmsnorm(x, norm.weight, norm.eps, HIGH_PRECISION) is None
    assert "not a CUDA tensor" in apex_ops.rmsnorm_unavailable(x, norm.weight, HIGH_PRECISION)
    assert torch.equal(norm(x), HIGH_PRECISION.rmsnorm(x, norm.weight, norm.eps))  # bit-identical fallback

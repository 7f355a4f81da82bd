"""Whole models per linear method: exact counts on meta, training, checkpoints, determinism, config validation."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megaeff.config.schema import Config, MethodConfig, ModelConfig
from megaeff.config.validate import validate_config
from megaeff.errors import CheckpointError, ConfigError
from megaeff.layers.linear import describe_method, index_buffers, linear_macs_per_token, method_layers
from megaeff.layers.lost import lost_decompose
from megaeff.models.init import init_weights, materialize
from megaeff.models.llama import build_llama, count_params
from megaeff.train import checkpoint as ckpt
from megaeff.train.perf import estimate_state_memory, state_memory

REPO = Path(__file__).resolve().parents[2]
METHODS = ("dense", "lowrank", "sltrain", "lost")

# Published totals (vocab 32000, untied head): GaLore/SLTrain Table 2 and the research notes' LOST formula.
PUBLISHED = {
    ("llama_60m", "lowrank_60m"): "42.77M",
    ("llama_130m", "lowrank_130m"): "94.00M",
    ("llama_350m", "lowrank_350m"): "185.22M",
    ("llama_1b", "lowrank_1b"): "609.31M",
    ("llama_60m", "sltrain_60m"): "43.53M",
    ("llama_130m", "sltrain_130m"): "96.55M",
    ("llama_350m", "sltrain_350m"): "194.29M",
    ("llama_1b", "sltrain_1b"): "645.55M",
    ("llama_60m", "lost_60m"): "44.01M",
    ("llama_130m", "lost_130m"): "98.21M",
    ("llama_350m", "lost_350m"): "200.28M",
    ("llama_1b", "lost_1b"): "669.52M",
    ("llama_7b", "lost_7b"): "3143.7M",
    ("llama_7b", "lowrank_7b"): "2820.94M",
    ("llama_7b", "sltrain_7b"): "3144.74M",
}
PUBLISHED_NNZ = {"llama_60m": "0.76M", "llama_130m": "2.55M", "llama_350m": "9.07M", "llama_1b": "36.24M"}


# Tiny shapes: one intra-op thread is faster and steadier on a shared machine.
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(**kw) -> ModelConfig:
    base = dict(name="t", dim=32, n_layers=2, n_heads=4, ffn_dim=64, vocab_size=50, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def method(name, **kw) -> MethodConfig:
    base = dict(rank=8, lost_channel_ratio=0.1) if name != "dense" else {}
    return MethodConfig(name=name, **{**base, **kw})


def build(name, seed=0, model=None, **kw):
    cfg = model or tiny()
    return materialize(build_llama(cfg, method(name, **kw), device="meta"), torch.device("cpu"), seed, cfg.init_std)


def expected_count(m: ModelConfig, me: MethodConfig) -> tuple:
    kv = (m.n_kv_heads or m.n_heads) * (m.dim // m.n_heads)
    shapes = [(m.dim, m.dim)] * 2 + [(kv, m.dim)] * 2 + [(m.ffn_dim, m.dim)] * 2 + [(m.dim, m.ffn_dim)]
    total, nnz = 2 * m.vocab_size * m.dim + m.n_layers * 2 * m.dim + m.dim, 0
    for out, inp in shapes * m.n_layers:
        if me.name == "dense":
            total += out * inp
            continue
        total += me.rank * (out + inp)
        if me.name == "sltrain":
            nnz += math.floor(me.density * out * inp)
        elif me.name == "lost":
            total += out * max(1, math.floor(me.lost_channel_ratio * inp))
    return total + nnz, nnz


# ----------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("flavor,preset", sorted(PUBLISHED))
def test_published_param_counts_on_meta(flavor, preset, compose_cfg):
    cfg = compose_cfg([f"model={flavor}", f"method={preset}"])
    model = build_llama(cfg.model, cfg.method, device="meta")
    n = count_params(model)
    total, nnz = expected_count(cfg.model, cfg.method)
    assert n == total
    decimals = 1 if PUBLISHED[(flavor, preset)] == "3143.7M" else 2
    assert f"{n / 1e6:.{decimals}f}M" == PUBLISHED[(flavor, preset)]
    layers_nnz = sum(getattr(layer, "nnz", 0) for _, layer in method_layers(model))
    assert layers_nnz == nnz
    if preset.startswith("sltrain") and flavor in PUBLISHED_NNZ:
        assert f"{nnz / 1e6:.2f}M" == PUBLISHED_NNZ[flavor]
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def test_lost_linear_macs_below_half_of_dense_at_60m(compose_cfg):
    macs = {}
    for preset in ("dense", "lost_60m", "lowrank_60m"):
        cfg = compose_cfg(["model=llama_60m", f"method={preset}"])
        macs[preset] = linear_macs_per_token(build_llama(cfg.model, cfg.method, device="meta"))
    assert macs["dense"] == 8 * (4 * 512 * 512 + 3 * 512 * 1376)
    assert macs["lost_60m"] / macs["dense"] == pytest.approx(0.444, abs=1e-3)  # the notes: 0.44
    assert macs["lowrank_60m"] < macs["lost_60m"] < 0.5 * macs["dense"]


def test_counts_of_tiny_models_match_formula_with_gqa():
    for name in METHODS:
        cfg = tiny(n_kv_heads=2)
        model = build_llama(cfg, method(name), device="meta")
        assert count_params(model) == expected_count(cfg, method(name))[0], name


# ----------------------------------------------------------------------------------------------- init
def test_lost_starts_from_the_dense_models_weights():
    dense, lost = build("dense", seed=4), build("lost", seed=4)
    for (name, d), (_, lo) in zip(method_layers(dense), method_layers(lost)):
        ref = lost_decompose(d.weight.detach(), lo.rank, lo.k)
        assert torch.equal(lo.A.detach(), ref.A.float()), name
        assert torch.equal(lo.sparse_weight.detach(), ref.sparse), name
        assert torch.equal(lo.channel_index.long(), ref.channels), name


def test_parallel_lost_init_equals_serial():
    """LOST's SVD inits run in threads (one intra-op thread each): bit-identical to a serial init."""
    models = []
    for workers in (1, 3):
        model = build_llama(tiny(), method("lost"), device="meta").to_empty(device="cpu")
        init_weights(model, 6, 0.02, workers=workers)
        models.append(model)
    for (n, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert torch.equal(a, b), n
    for (n, a), (_, b) in zip(index_buffers(models[0]), index_buffers(models[1])):
        assert torch.equal(a, b), n


def test_dense_state_dict_keys_unchanged():
    keys = set(build("dense").state_dict())
    assert "layers.0.attention.q.weight" in keys and "layers.1.mlp.down.weight" in keys
    assert not any("index" in k for k in keys)


_PROBE = r"""
import hashlib, json, sys, torch
from megaeff.layers.lost import LostLinear
from megaeff.layers.sltrain import SLTrainLinear
from megaeff.models.init import Initializer
def digest(t): return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()
lost = LostLinear(96, 80, rank=12, channel_ratio=0.1, name="layers.2.mlp.up")
lost.init_weights("layers.2.mlp.up", Initializer(21, 0.02))
sl = SLTrainLinear(96, 80, rank=12, alpha=4.0, density=0.05, name="layers.2.mlp.up")
sl.init_weights("layers.2.mlp.up", Initializer(21, 0.02))
RESULT = {"channels": lost.channel_index.tolist(), "A": digest(lost.A), "B": digest(lost.B),
          "support": digest(sl.sparse_index), "values": digest(sl.sparse_values)}
print(json.dumps(RESULT))
"""


def test_supports_and_channels_are_identical_across_processes():
    """Another process, with another thread count, regenerates the same LOST split and SLTrain support."""
    results = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(REPO))
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, cwd=REPO, capture_output=True, text=True, check=True
        )
        results.append(json.loads(out.stdout))
    namespace = {}
    exec(compile(_PROBE, "probe", "exec"), namespace)  # the same code in this process (stdout is captured)
    local = namespace["RESULT"]
    assert results[0] == results[1] == local
    assert len(local["channels"]) == 9 and local["channels"] == sorted(local["channels"])


# ----------------------------------------------------------------------------------------------- training
def _train(model, steps=12, lr=1e-2):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (4, 17), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, opt


@pytest.mark.parametrize(
    "name,kw",
    [
        ("dense", {}),
        ("lowrank", {}),
        ("sltrain", dict(sltrain_path="dense")),
        ("sltrain", dict(sltrain_path="sparse")),
        ("lost", {}),
        ("lost", dict(lost_act="none")),
    ],
    ids=["dense", "lowrank", "sltrain-dense", "sltrain-sparse", "lost-silu", "lost-none"],
)
def test_each_method_trains(name, kw):
    model = build(name, seed=1, **kw)
    losses, opt = _train(model)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(p.grad is not None for p in model.parameters())
    # The accounting of a real run equals the shape-only estimate (fp32 weights, grads and AdamW states).
    measured, estimated = state_memory(model, opt), estimate_state_memory(model)
    for key in ("mem_params_bytes", "mem_grads_bytes", "mem_optim_bytes", "mem_index_bytes"):
        assert measured[key] == estimated[key], key
    layers = [layer for _, layer in method_layers(model)]
    entries = {"sltrain": sum(getattr(x, "nnz", 0) for x in layers), "lost": sum(getattr(x, "k", 0) for x in layers)}
    checksums = 8 * len(layers) if name in ("sltrain", "lost") else 0
    assert measured["mem_index_bytes"] == 4 * entries.get(name, 0) + checksums  # int32 entries + one int64 each


# ----------------------------------------------------------------------------------------------- checkpoints
def _save(model, opt, root):
    return ckpt.save_checkpoint(
        root,
        2,
        model=model,
        optimizer=opt,
        trainer_state={"step": 2, "consumed_samples": 8},
        config_yaml="{}",
        rank=0,
        world_size=1,
        keep_last=2,
    )


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_round_trip(name, tmp_path):
    model = build(name, seed=3)
    _, opt = _train(model, steps=2)
    keys = set(model.state_dict())
    assert not any(k.endswith(("sparse_index", "channel_index")) for k in keys)  # regenerated, not stored
    assert any(k.endswith("index_checksum") for k in keys) == (name in ("sltrain", "lost"))
    path = _save(model, opt, tmp_path / "ckpt")
    fresh = build(name, seed=3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    ckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt, rank=0)
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(tokens), fresh(tokens))
    for (n, a), (_, b) in zip(index_buffers(model), index_buffers(fresh)):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name,buffer", [("sltrain", "sparse_index"), ("lost", "channel_index")])
def test_checkpoint_from_another_seed_is_rejected(name, buffer, tmp_path):
    model = build(name, seed=3)
    _, opt = _train(model, steps=1)
    path = _save(model, opt, tmp_path / "ckpt")
    other = build(name, seed=4)
    with pytest.raises(CheckpointError, match=buffer):
        ckpt.load_checkpoint(path, model=other, optimizer=torch.optim.AdamW(other.parameters()), rank=0)


# ----------------------------------------------------------------------------------------------- config
def _config(**method_kw) -> Config:
    cfg = Config()
    cfg.model = tiny(dim=64, ffn_dim=128, vocab_size=264, max_seq_len=128)
    cfg.data.seq_len = 64
    cfg.train.steps, cfg.optim.warmup_steps = 20, 5
    cfg.method = dataclasses.replace(MethodConfig(), **method_kw)
    return cfg


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(name="sltrain", rank=64), "method.rank"),
        (dict(name="lowrank", rank=0), "method.rank"),
        (dict(name="lost", rank=100), "method.rank"),
        (dict(name="sltrain", density=0.0), "method.density"),
        (dict(name="sltrain", density=1.0), "method.density"),
        (dict(name="sltrain", density=1e-5), "method.density"),
        (dict(name="sltrain", alpha=0.0), "method.alpha"),
        (dict(name="sltrain", sltrain_path="fast"), "method.sltrain_path"),
        (dict(name="lost", lost_channel_ratio=0.0), "method.lost_channel_ratio"),
        (dict(name="lost", lost_channel_ratio=1.5), "method.lost_channel_ratio"),
        (dict(name="lost", lost_gamma=1.5), "method.lost_gamma"),
        (dict(name="lost", lost_gamma=-0.1), "method.lost_gamma"),
        (dict(name="lost", lost_act="relu"), "method.lost_act"),
        (dict(name="lost", lost_complement_rank=0), "method.lost_complement_rank"),
        (dict(name="lost", lost_sparse_init="random"), "method.lost_sparse_init"),
        (dict(name="sparse"), "method.name"),
    ],
)
def test_method_validation_names_field(kw, field):
    with pytest.raises(ConfigError) as exc:
        validate_config(_config(**kw))
    assert exc.value.field == field and f"'{field}'" in str(exc.value)


def test_rank_is_checked_against_gqa_kv_width():
    cfg = _config(name="lowrank", rank=16)
    validate_config(cfg)
    cfg.model.n_kv_heads = 1  # k and v become 64 -> 16
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    assert exc.value.field == "method.rank"
    validate_config(_config(name="dense", rank=10_000))  # dense ignores the method fields


@pytest.mark.parametrize("preset", ["lowrank", "sltrain", "lost"])
def test_generic_presets_fit_the_tiny_default_model(preset, compose_cfg):
    cfg = compose_cfg([f"method={preset}"])
    validate_config(cfg, world_size=1, tokenizer_vocab=257)
    model = materialize(build_llama(cfg.model, cfg.method), torch.device("cpu"), 0, cfg.model.init_std)
    text = describe_method(model, tokens=cfg.train.micro_batch_size * cfg.data.seq_len)
    assert text.startswith(preset) and "128x128 x16" in text
    if preset == "sltrain":
        assert "path at 4096 tokens/call" in text

"""GaLore (megaeff/optim/galore.py, galore_projector.py): the projected update against a float64 reference
written out by hand, equality with AdamW where the math says so (and not where it does not), the randomized
subspace iteration against its principal-angle bound, seeded refreshes, cross-head bases, the state bytes,
the checkpoint round trip, the config refusals and a CLI run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megaeff.config.schema import Config, MethodConfig, OptimConfig, validate_sections
from megaeff.errors import ConfigError
from megaeff.optim.builder import build_optimizer
from megaeff.optim.galore import GaLoreAdamW, galore_targets
from megaeff.optim.galore_projector import (
    compute_basis,
    head_slice,
    randomized_left_basis,
    refresh_seed,
    sketch,
    svd_basis,
)
from megaeff.train.perf import estimate_state_memory, state_memory
from tests.helpers import records, train

F64 = torch.float64
# float64 roundoff over a few steps of O(1) arithmetic on O(1) values: each element sees ~20 flops per step, each
# off by <= 1.1e-16 relative; 6 steps x 20 x 1.1e-16 ~ 1.3e-14. The bases come from LAPACK SVDs, orthonormal to
# ~n x 1e-16. 1e-12 keeps a factor ~50 of margin, and any wrong formula (bias correction, scale, side, eps
# placement at eps=1e-3) moves the weights by >= 1e-4.
TOL = 1e-12


def grads(shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=F64) for _ in range(steps)]


def reference_galore(w, gs, *, rank, gap, scale, lr, betas, eps, wd):
    """GaLore's update written out from the paper's definitions (not the module's code), in float64."""
    w, (b1, b2) = w.clone(), betas
    m_rows, n_cols = w.shape
    left = m_rows < n_cols  # the smaller side (GaLore's "std": right when rows >= cols)
    mom = vel = basis = None
    for t, g in enumerate(gs, start=1):
        if (t - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            basis = u[:, :rank] if left else vh[:rank].T
        r = basis.T @ g if left else g @ basis
        mom = (1 - b1) * r if mom is None else b1 * mom + (1 - b1) * r
        vel = (1 - b2) * r * r if vel is None else b2 * vel + (1 - b2) * r * r
        n = (mom / (1 - b1**t)) / ((vel / (1 - b2**t)).sqrt() + eps)
        w = w * (1 - lr * wd) - lr * scale * (basis @ n if left else n @ basis.T)
    return w


def run_galore(w, gs, **kw):
    p = torch.nn.Parameter(w.clone())
    opt = GaLoreAdamW([{"params": [p], "galore": True}], **kw)
    for g in gs:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["left_m_lt_n", "right_m_ge_n"])
def test_projected_update_matches_a_dense_float64_reference(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    gs = grads(shape, 6, seed=2)
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1)
    got, opt = run_galore(w, gs, rank=3, update_proj_gap=2, scale=0.25, **hp)
    ref = reference_galore(w, gs, rank=3, gap=2, scale=0.25, lr=1e-2, betas=(0.9, 0.95), eps=1e-3, wd=0.1)
    assert (got - ref).abs().max() <= TOL
    st = opt.state[opt.param_groups[0]["params"][0]]
    r_shape = (3, shape[1]) if shape[0] < shape[1] else (shape[0], 3)
    assert st["exp_avg"].shape == r_shape and st["projector"].shape == (min(shape), 3)
    # A refresh every step is another algorithm: the reference must tell them apart.
    other = reference_galore(w, gs, rank=3, gap=1, scale=0.25, lr=1e-2, betas=(0.9, 0.95), eps=1e-3, wd=0.1)
    assert (other - ref).abs().max() > 1e-4


def orthogonal_lines(shape, seed):
    """A gradient whose rows (m < n) or columns (m >= n) are orthogonal with distinct norms: its SVD basis on
    the projected side is a signed permutation."""
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    q, _ = torch.linalg.qr(torch.randn(max(m, n), k, generator=g, dtype=F64))
    s = torch.linspace(3.0, 1.0, k, dtype=F64)
    return torch.diag(s) @ q.T if m < n else q @ torch.diag(s)


@pytest.mark.parametrize("shape", [(5, 8), (8, 5)], ids=["left", "right"])
def test_full_rank_galore_with_a_permutation_basis_is_adamw(shape):
    """r = min(m, n), scale 1: Adam's element-wise math commutes with signed permutations, so the update is AdamW's
    exactly. With a generic rotation it is not (Adam is not rotation invariant): checked below too."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    gs = [orthogonal_lines(shape, 4)] + grads(shape, 5, seed=5)
    got, _ = run_galore(w, gs, rank=min(shape), update_proj_gap=1000, scale=1.0, **hp)
    p = torch.nn.Parameter(w.clone())
    adamw = torch.optim.AdamW([p], foreach=False, **hp)
    for g in gs:
        p.grad = g.clone()
        adamw.step()
    assert (got - p.detach()).abs().max() <= TOL
    rotated = [grads(shape, 1, seed=6)[0]] + gs[1:]
    got_rot, _ = run_galore(w, rotated, rank=min(shape), update_proj_gap=1000, scale=1.0, **hp)
    p2 = torch.nn.Parameter(w.clone())
    adamw2 = torch.optim.AdamW([p2], foreach=False, **hp)
    for g in rotated:
        p2.grad = g.clone()
        adamw2.step()
    assert (got_rot - p2.detach()).abs().max() > 1e-4


def gapped_matrix(m, n, r, gamma, seed):
    """A = U diag(s) V^T with s_1..s_r in [1, 2] and the rest gamma x [0.5, 1]: s_{r+1} / s_r = gamma."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    k = min(m, n)
    s = torch.cat([torch.linspace(2, 1, r, dtype=F64), gamma * torch.linspace(1, 0.5, k - r, dtype=F64)])
    return u[:, :k] @ torch.diag(s) @ v[:, :k].T, u[:, :r], v


def tan_largest_angle(a, b):
    """tan of the largest principal angle between the spans of orthonormal a and b (same width), from its sine
    ||(I - b b^T) a||_2, which unlike acos of the cosine keeps its precision at small angles."""
    sin = float(torch.linalg.matrix_norm(a - b @ (b.T @ a), 2))
    return sin / math.sqrt(max(1.0 - sin * sin, 1e-300))


def test_randomized_subspace_iteration_reaches_the_svd_subspace():
    """Saibaba 2019 (Thm. 1): tan of the largest principal angle between the top-r subspace and the sketch's range
    is at most gamma^(2q+1) ||O_2 O_1^+||, O_1 / O_2 the sketch on the top-r / other right singular vectors. The
    tolerance is that bound for the actual sketch (the seeded one the code draws), times 2 for the Rayleigh-Ritz
    extraction of r of the r + oversample directions. Without power iterations and with a small gap the angle is
    of order one, far outside it."""
    m, n, r, over, seed = 40, 60, 4, 4, refresh_seed(0, 0, "w")

    def angle_and_bound(gamma, q):
        a, ur, v = gapped_matrix(m, n, r, gamma, seed=7)
        basis = randomized_left_basis(a, r, q, over, seed)
        om = sketch(n, r + over, seed, F64)
        spread = torch.linalg.matrix_norm((v[:, r:].T @ om) @ torch.linalg.pinv(v[:, :r].T @ om), 2)
        return tan_largest_angle(ur, basis), 2 * gamma ** (2 * q + 1) * float(spread)

    angle, tol = angle_and_bound(0.1, 2)
    assert angle <= tol and tol < 1e-3
    weak, _ = angle_and_bound(0.9, 0)
    assert weak > 100 * tol
    # And the exact SVD basis has angle ~0 to the same subspace.
    a, ur, _ = gapped_matrix(m, n, r, 0.1, seed=7)
    assert tan_largest_angle(ur, svd_basis(a, r, "left")) < 1e-10


def test_refreshes_are_seeded_by_seed_step_and_name():
    g = grads((12, 20), 1, seed=8)[0]
    kw = dict(rank=4, side="left", projector="randomized", power_iters=1, oversample=2)
    a = compute_basis(g, seed=refresh_seed(0, 200, "layers.0.mlp.up.weight"), **kw)
    b = compute_basis(g.clone(), seed=refresh_seed(0, 200, "layers.0.mlp.up.weight"), **kw)
    c = compute_basis(g, seed=refresh_seed(0, 400, "layers.0.mlp.up.weight"), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert refresh_seed(0, 200, "a") != refresh_seed(0, 200, "b") != refresh_seed(1, 200, "b")
    # The global RNG plays no part.
    torch.manual_seed(123)
    assert torch.equal(a, compute_basis(g, seed=refresh_seed(0, 200, "layers.0.mlp.up.weight"), **kw))


@pytest.mark.parametrize("axis", [0, 1], ids=["qkv_rows", "o_cols"])
def test_cross_head_basis_is_one_heads_svd_applied_to_all_heads(axis):
    head_dim, heads, d = 4, 3, 10
    shape = (heads * head_dim, d) if axis == 0 else (d, heads * head_dim)
    g = grads(shape, 1, seed=9)[0]
    side = "right" if axis == 0 else "left"
    seed = refresh_seed(0, 0, "layers.0.attention.q.weight")
    basis = compute_basis(
        g, rank=3, side=side, projector="svd", power_iters=0, oversample=0, seed=seed, heads_axis=axis, head_dim=4
    )
    first = int(torch.randint(0, heads, (), generator=torch.Generator().manual_seed(seed)))
    expected = svd_basis(head_slice(g, axis, head_dim, 1, first), 3, side)
    assert torch.equal(basis, expected) and basis.shape == (d, 3)
    # Rank above head_dim: consecutive heads (wrapping) give the rank.
    wide = compute_basis(
        g, rank=6, side=side, projector="svd", power_iters=0, oversample=0, seed=seed, heads_axis=axis, head_dim=4
    )
    assert torch.allclose(wide.T @ wide, torch.eye(6, dtype=F64), atol=1e-12)


def tiny_model(seed=0):
    from megaeff.models.init import materialize
    from megaeff.models.llama import build_llama

    mcfg = dataclasses.replace(Config().model, dim=32, ffn_dim=48, n_heads=4, n_layers=1, vocab_size=40)
    return materialize(build_llama(mcfg, MethodConfig()), torch.device("cpu"), seed, mcfg.init_std)


def galore_cfg(**kw):
    return dataclasses.replace(OptimConfig(), name="galore", galore_rank=4, galore_update_proj_gap=2, **kw)


def step_model(model, opt, steps, seed=10):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("cross_head", [False, True])
def test_state_bytes_count_projected_moments_and_projector(cross_head):
    model = tiny_model()
    ocfg = galore_cfg(galore_cross_head=cross_head, galore_projector="randomized")
    opt, description = build_optimizer(model, ocfg, torch.device("cpu"))
    assert "GaLore" in description and len(galore_targets(model)) == 7
    step_model(model, opt, 1)
    measured, estimated = state_memory(model, opt), estimate_state_memory(model, ocfg=ocfg)
    assert measured["mem_optim_bytes"] == estimated["mem_optim_bytes"]
    # By hand (dim 32, ffn 48, rank 4, fp32): q k v o 32x32, gate up 48x32 (right: 48x4 moments, 32x4 basis),
    # down 32x48 (left: 4x48, 32x4). Cross-head: q k v right, o left -- the same shapes here.
    per_weight = 4 * [2 * 32 * 4 + 32 * 4] + 3 * [2 * 48 * 4 + 32 * 4]
    plain = sum(2 * p.numel() for n, p in model.named_parameters() if n not in galore_targets(model))
    n_tensors = len(list(model.parameters()))
    assert measured["mem_optim_bytes"] == 4 * (sum(per_weight) + plain) + 8 * n_tensors
    assert estimated["projector_bytes"] == 4 * 7 * 32 * 4
    assert measured["mem_optim_bytes"] < estimate_state_memory(model)["mem_optim_bytes"]  # AdamW's


def test_checkpoint_round_trip_resumes_bit_for_bit(tmp_path):
    from megaeff.train import checkpoint as ckpt

    ocfg = galore_cfg(galore_projector="randomized")
    model = tiny_model()
    opt, _ = build_optimizer(model, ocfg, torch.device("cpu"), seed=5)
    step_model(model, opt, 3)
    path = ckpt.save_checkpoint(
        tmp_path,
        3,
        model=model,
        optimizer=opt,
        trainer_state={"step": 3, "consumed_samples": 0},
        config_yaml="{}",
        rank=0,
        world_size=1,
        keep_last=1,
    )
    fresh = tiny_model(seed=1)
    fresh_opt, _ = build_optimizer(fresh, ocfg, torch.device("cpu"), seed=5)
    ckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt, rank=0)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert set(opt.state[p]) == set(fresh_opt.state[q])
        assert all(torch.equal(opt.state[p][k], fresh_opt.state[q][k]) for k in opt.state[p])
    # Steps 4 and 5 cross a refresh (gap 2, at update count 4): same seeds, same bases, same weights.
    step_model(model, opt, 2, seed=11)
    step_model(fresh, fresh_opt, 2, seed=11)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda c: setattr(c.method, "name", "lowrank"), "method.name"),
        (lambda c: setattr(c.precision, "fp8_optimizer_states", True), "precision.fp8_optimizer_states"),
        (lambda c: setattr(c.parallel, "tp", 2), "parallel.tp"),
        (lambda c: setattr(c.parallel, "dp_impl", "fssdp"), "parallel.dp_impl"),
        (lambda c: setattr(c.optim, "in_backward", True), "optim.in_backward"),
        (lambda c: setattr(c.optim, "galore_rank", 0), "optim.galore_rank"),
        (lambda c: setattr(c.optim, "galore_scale", -1.0), "optim.galore_scale"),
        (lambda c: setattr(c.optim, "galore_projector", "qr"), "optim.galore_projector"),
    ],
)
def test_galore_refuses_what_it_cannot_run_naming_the_field(change, field):
    cfg = Config()
    cfg.optim = galore_cfg()
    if field == "precision.fp8_optimizer_states":
        cfg.precision.name = "coat"
    validate_sections(cfg)  # the plain config is fine
    change(cfg)
    with pytest.raises(ConfigError) as exc:
        validate_sections(cfg)
    assert exc.value.field == field


@pytest.mark.slow
def test_cli_trains_with_galore(tmp_path):
    """`megaeff-train optim=galore` on the smoke model: the loss falls and the metrics carry GaLore's state bytes
    (fewer than AdamW's 2 x 4 bytes per parameter)."""
    out = train(
        tmp_path,
        "experiment=smoke",
        "optim=galore",
        "optim.galore_rank=8",
        "optim.galore_update_proj_gap=4",
        "optim.galore_projector=randomized",
        "optim.lr=1e-2",
        "train.steps=12",
        "train.eval_interval=12",
        "train.ckpt_interval=12",
        "train.plot=false",
        "train.threads=1",
    )
    assert "GaLore AdamW: rank 8" in out
    rows = records(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert rows[-1]["mem_optim_bytes"] < 2 * rows[-1]["mem_params_bytes"]


def test_estimate_memory_cli_counts_galore_state():
    """`megaeff-estimate-memory --set optim=galore`: the optimizer column is GaLore's state, projector included."""
    from megaeff.cli.estimate_memory import estimate

    galore = estimate("tiny", "dense", ["optim=galore", "optim.galore_rank=16"])
    adamw = estimate("tiny", "dense")
    # tiny: dim 128, ffn 352, 4 layers. Per layer q k v o 128x128 (right): moments 2 x 128 x 16, basis 128 x 16;
    # gate up 352x128 (right): 2 x 352 x 16 + 128 x 16; down 128x352 (left): 2 x 16 x 352 + 128 x 16.
    per_layer = 4 * (2 * 128 * 16 + 128 * 16) + 3 * (2 * 352 * 16 + 128 * 16)
    dense_moments = 2 * (4 * 128 * 128 + 3 * 352 * 128)
    n_tensors = 2 + 9 * 4 + 1  # embedding, head, final norm; per layer 2 norms + 7 weights
    # fp32 moments and bases, 4 layers; the step counter is int64 (8 B) here, AdamW's fp32 (4 B).
    expected = adamw["mem_optim_bytes"] - 4 * 4 * (dense_moments - per_layer) + 4 * n_tensors
    assert galore["optimizer"] == "galore" and galore["projector_bytes"] == 4 * 4 * 7 * 128 * 16
    assert galore["mem_optim_bytes"] == expected

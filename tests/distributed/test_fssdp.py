"""FSSDP (megaeff/distributed/fssdp/engine.py) against plain data parallelism (GradReducer), on 4 gloo ranks.

Every rank builds the same tiny LLaMA from the seed twice, once replicated with the bucketed all-reduce and once
sharded by FSSDP, and trains both for 3 optimizer steps of 2 micro-batches on the same data (loss / global
tokens, gradient clipping active) with AdamW and with COAT (FP8 moments for every tensor). The tests compare on
this side: losses, norms, first-step gradients and the logical parameters and optimizer state; bytes of every
collective against the sizes of the gathered tensors; per-rank memory against 1/dp of the plain run; the
gathered bytes alive between forward and backward; bf16 / FP8 gathers; heterogeneous sharding; checkpoint round
trips; tensor parallelism underneath.

What "equal" means. At dp=2 a sum over two ranks does not depend on the order, so FSSDP with
`defer_accumulation` (micro-batches summed locally first, as DP does) reproduces DP bit for bit: gradients,
parameters, COAT's FP8 codes and metadata. At dp=4 gloo's all-reduce and reduce-scatter (and the embedding's
row exchange, added in source-rank order) add the same per-rank, per-micro-batch terms in another order; FSSDP's
default (one reduce-scatter per micro-batch) changes the order too. The first step's gradients are then checked
against the bound of any summation order of those terms, computed from them (equivalence_bounds.py; measured:
at most 0.9 of it). AdamW turns the last-bit differences into parameter differences where a gradient element
nearly cancels (its update is g / (|g| + eps)), so the AdamW runs use eps=1e-6 and agree to 1e-5 of each
tensor's scale. COAT's FP8 moments are checked against what rounding to each run's grid can do, step by step,
and its parameters against the updates those moments give (equivalence_bounds.py; measured: the moments at most
0.9 of their bound; the parameters reach theirs up to rounding, the updates being recomputed exactly). A count
of differing codes is no bound: a group whose expansion exponent k sits on a 1/16 boundary changes all its codes
(e.g. one group of tok_embeddings' first moment, 112 of its 128 codes, at the third step: 16 log2(FMAX^2/2) /
log2(mx/mn) was 23.0004 in one run and 22.99998 in the other, k 23/16 against 22/16), and the next update of its
elements moves by up to a code gap of m (measured: parameters 5% of lr apart).

dp=2 runs on the same pool as the layout tp=2 x dp=2 with a model that is *not* tensor-parallel: the two tp
peers repeat the same dp=2 run (one spawn of four ranks serves every test).
"""

from __future__ import annotations

import math

import pytest
import torch

from megaeff.config.schema import MethodConfig
from megaeff.distributed.dims import ParallelDims
from megaeff.distributed.fssdp.engine import FSSDP
from megaeff.distributed.fssdp.layout import dim0_bounds
from megaeff.layers.param_meta import param_meta
from megaeff.models.llama import build_llama
from megaeff.precision.fp8 import get_format
from megaeff.precision.group_quant import GroupLayout
from tests.distributed.equivalence_bounds import (
    assert_coat_params,
    assert_fp8_moments,
    assert_summation_order,
    grad_bounds,
)
from tests.distributed.fssdp_runs import (
    ACCUM,
    CFG,
    F32,
    LAYOUT,
    MAX_NORM,
    METHODS,
    OPTIMS,
    STEPS,
    batch,
    build,
    checkpoint_round_trip,
    dtype_runs,
    heterogeneous_runs,
    loss_sum,
    matrix_runs,
    reshard_runs,
    tensor_parallel_runs,
)
from tests.distributed.harness import pool_fixture

pytestmark = pytest.mark.slow

pool = pool_fixture(4)


def close(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> None:
    """Max abs difference within `rel` of the reference tensor's scale (elementwise relative error is
    meaningless where a gradient element nearly cancels)."""
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= rel * ref.double().abs().max().item() + 1e-30, (
        f"{what}: {err:.3g} vs scale {ref.abs().max().item():.3g}"
    )


def assert_same_training(dp, fs, exact: bool, param_rel: float = 1e-5, bounds=None):
    """`exact`: bit for bit. Otherwise (equivalence_bounds.py) both runs' first-step gradients within the bound
    of any summation order of their terms (`bounds`, from `grad_bounds`); with COAT (a `trace`) the FP8 moments
    within what rounding to each run's grid can do at every step and the parameters within the updates those
    moments give; AdamW's parameters to `param_rel` of each tensor's scale, the eval logits to 10 x that, fp32
    moments to 1e-4."""
    torch.testing.assert_close(torch.tensor(fs["losses"]), torch.tensor(dp["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(fs["norms"]), torch.tensor(dp["norms"]), rtol=1e-5, atol=0)
    assert all(n > MAX_NORM for n in dp["norms"])
    assert fs["params"].keys() == dp["params"].keys() and fs["grads"].keys() == dp["grads"].keys()
    for name, ref in dp["grads"].items():
        if exact:
            assert torch.equal(fs["grads"][name], ref), name
        else:
            assert_summation_order(ref, *bounds[name], f"DP grad {name}")
            assert_summation_order(fs["grads"][name], *bounds[name], f"FSSDP grad {name}")
    traced = dp["trace"][-1]["ostate"] if dp["trace"] else {}  # COAT: parameters bounded below
    for name, ref in dp["params"].items():
        if exact:
            assert torch.equal(fs["params"][name], ref), name
        elif name not in traced:
            close(fs["params"][name], ref, param_rel, name)
    if exact:
        assert torch.equal(fs["eval"], dp["eval"])
    else:
        close(fs["eval"], dp["eval"], param_rel * 10, "eval logits")
    assert fs["live_after_eval"] == 0
    assert fs["ostate"].keys() == dp["ostate"].keys()
    for name, st in dp["ostate"].items():
        assert fs["ostate"][name].keys() == st.keys()
        for key, ref in st.items():
            got = fs["ostate"][name][key]
            if not torch.is_tensor(ref) or ref.dim() == 0:
                assert int(got) == int(ref), (name, key)
            elif exact:
                assert torch.equal(got, ref), (name, key)
            elif ref.dtype != torch.uint8 and not key.endswith("_meta"):  # fp32 moments; FP8 ones below
                close(got, ref, 1e-4, f"{name} {key}")
    if not exact and traced:
        assert traced.keys() == dp["ostate"].keys()
        o = OPTIMS["coat"]
        formats = {"exp_avg": get_format(o.first_moment), "exp_avg_sq": get_format(o.second_moment)}
        assert_fp8_moments(dp["trace"], fs["trace"], o.betas, formats)
        assert_coat_params(dp["trace"], fs["trace"], dp["params"], fs["params"], o, formats)


def unit_bytes(fs):
    """Compact fp32 bytes of the blocks' and of the rest-unit's (dense-gathered) sharded tensors."""
    shard = {n: numel for n, (kind, numel) in fs["specs"].items() if kind == "shard" and n not in fs["sparse"]}
    blocks = F32 * sum(v for n, v in shard.items() if n.startswith("layers."))
    return blocks, F32 * sum(shard.values()) - blocks


class _Rank:
    def __init__(self, dp_rank):
        self.dp_rank = dp_rank


def sparse_bytes(fs, step: int):
    """What this rank sends in one step through the sparse embedding, from the data of every rank: the rows
    others (and itself) ask of its shard, the gradient rows of its own tokens, and the ids and counts."""
    if not fs["sparse"]:
        return {}
    ((a, b),) = [bounds[fs["rank"]] for bounds in fs["sparse"].values()]
    dp, dim = fs["dp"], CFG.dim
    ids = {(r, i): batch(_Rank(r), step, i)[0].unique() for r in range(dp) for i in range(ACCUM)}
    mine = [ids[fs["rank"], i] for i in range(ACCUM)]
    served = sum(int(((v >= a) & (v < b)).sum()) for v in ids.values())
    reduced = [torch.cat(mine).unique()] if fs["defer"] else mine
    return {
        "dp_cp/sparse_all_gather": F32 * dim * served,
        "dp_cp/sparse_reduce_scatter": F32 * dim * sum(len(r) for r in reduced),
        "dp_cp/all_to_all": 8 * sum(dp + len(u) for u in mine + reduced),
    }


def assert_bytes(dp, fs, reshard: bool = True, defer: bool = True):
    """Every collective of every step against the tensors. A gather moves the compact tensors (never a dense
    weight, never an index), padded to the largest shard; the blocks are gathered twice per micro-batch when
    resharded, the rest-unit (head) once; the embedding moves only the rows of the batch's tokens."""
    blocks, rest = unit_bytes(fs)
    pad = F32 * fs["padding"]
    assert fs["per_pass"] == blocks + rest + pad
    replicated = F32 * sum(dp["sizes"][n] for n in fs["replicated"])
    for step in fs["comm"]:
        gathered = step["dp_cp/all_gather"]
        lo = ACCUM * ((2 if reshard else 1) * blocks + rest)
        assert lo <= gathered <= lo + ACCUM * (2 if reshard else 1) * pad
        if pad == 0:
            assert gathered == lo
        assert step["dp_cp/reduce_scatter"] == (1 if defer else ACCUM) * (blocks + rest + pad)
        assert step.get("dp_cp/all_reduce", 0) == replicated
    for i, step in enumerate(fs["comm"]):
        sparse = {
            k: v
            for k, v in step.items()
            if k in ("dp_cp/sparse_all_gather", "dp_cp/sparse_reduce_scatter", "dp_cp/all_to_all")
        }
        assert sparse == sparse_bytes(fs, i)
    assert fs["last_step"] == {k: v for k, v in fs["comm"][-1].items() if k.startswith("dp_cp")}
    # The plain run all-reduces every gradient once per step.
    assert {k: v for k, v in dp["comm"][0].items() if k.startswith("dp_cp")} == {
        "dp_cp/all_reduce": F32 * sum(dp["sizes"].values())
    }


def optim_bytes_of(shape, optim: str) -> int:
    """Optimizer tensor bytes of one parameter: AdamW two fp32 moments; COAT two FP8 codes plus a
    [n_groups, 3] fp32 metadata row per moment, groups laid out from the tensor's own shape."""
    n = math.prod(shape)
    return 8 * n if optim == "adamw" else 2 * n + 2 * 12 * GroupLayout.for_shape(shape).n_groups


def assert_one_over_dp(dp_ranks, fs_ranks, dp: int, optim: str):
    """Params, grads and optimizer tensors, read from the tensors: the sharded part is split across ranks with
    nothing duplicated and each rank holds 1/dp of it (up to the padding); the replicated part (norm gains) is
    whole on every rank; the optimizer's FP8 groups of the shards add up to the logical tensor's."""
    fs0, dp0 = fs_ranks[0], dp_ranks[0]
    sharded = [n for n, (kind, _) in fs0["specs"].items() if kind == "shard"]
    total = sum(dp0["sizes"].values())
    repl = sum(dp0["sizes"][n] for n in fs0["replicated"])
    per_rank = [sum(math.prod(r["shards"][n]) for n in sharded) for r in fs_ranks]
    assert sum(per_rank) == total - repl
    for r, n in zip(fs_ranks, per_rank):
        assert n <= (total - repl) / dp + fs0["padding"]
        if fs0["padding"] == 0:
            assert n * dp == total - repl
        assert r["mem"]["mem_params_bytes"] == r["mem"]["mem_grads_bytes"] == F32 * (n + repl)
        assert r["mem"]["optim_tensors"] == sum(optim_bytes_of(shape, optim) for shape in r["shards"].values())
    logical_shapes = {n: tuple(t.shape) for n, t in dp0["params"].items() if n in dp0["sizes"]}
    assert dp0["mem"]["optim_tensors"] == sum(optim_bytes_of(s, optim) for s in logical_shapes.values())
    shard_optim = sum(optim_bytes_of(r["shards"][n], optim) for r in fs_ranks for n in sharded)
    assert shard_optim == sum(optim_bytes_of(logical_shapes[n], optim) for n in sharded)  # groups survive sharding
    assert max(r["mem"]["optim_tensors"] for r in fs_ranks) < dp0["mem"]["optim_tensors"] / dp * 1.1 + 2 * sum(
        optim_bytes_of(logical_shapes[n], optim) for n in fs0["replicated"]
    )


def ranks_of(dp: int, res):
    """The results of one dp group (dp=2 runs twice, on the tp peers)."""
    return res if dp == 4 else res[0::2]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dp", [2, 4])
def test_matches_data_parallel(pool, dp, method):
    res = ranks_of(dp, pool.run(matrix_runs, method, layout=LAYOUT[dp]))
    bounds = {o: grad_bounds([r[o][0] for r in res]) for o in OPTIMS}
    for r in res:
        dp_res, fs_res = r["adamw"]
        assert_same_training(dp_res, fs_res, exact=dp == 2, bounds=bounds["adamw"])
        assert_bytes(dp_res, fs_res)
        dp_res, fs_res = r["coat"]
        assert_same_training(dp_res, fs_res, exact=dp == 2, param_rel=1e-2, bounds=bounds["coat"])
        assert all(
            st["exp_avg"].dtype == torch.uint8 and "exp_avg_meta" in st for st in fs_res["ostate"].values()
        )  # all FP8
        assert_bytes(dp_res, fs_res)
    for o in OPTIMS:
        assert_one_over_dp([r[o][0] for r in res], [r[o][1] for r in res], dp, o)
    fs_res = res[0]["adamw"][1]
    assert {k for k, _ in fs_res["specs"].values()} == {"shard"} and list(fs_res["sparse"]) == ["tok_embeddings.weight"]
    assert sorted(fs_res["replicated"]) == sorted(
        n for n in fs_res["shards"] if n.endswith("norm.weight")
    )  # norm gains
    assert (fs_res["padding"] > 0) == (method == "sltrain")  # 409 sparse values = 3 full groups + 25, never even


def test_reshard_after_forward_frees_and_matches(pool):
    """FSSDP's default accumulation (one reduce-scatter per micro-batch), resharded or not."""
    res = pool.run(reshard_runs, "lost", layout=LAYOUT[4])
    bounds = grad_bounds([r[0] for r in res])
    for dp_res, resharded, kept in res:
        for name, t in resharded["params"].items():
            assert torch.equal(t, kept["params"][name]), name  # the same arithmetic, bit for bit
        assert resharded["losses"] == kept["losses"]
        assert_same_training(dp_res, resharded, exact=False, bounds=bounds)
        assert_bytes(dp_res, resharded, reshard=True, defer=False)
        assert_bytes(dp_res, kept, reshard=False, defer=False)
        blocks, rest = unit_bytes(resharded)
        n = STEPS * ACCUM
        # Between forward and backward only the rest-unit (the head; the embedding gathers rows) is alive, the
        # blocks' storages are freed.
        assert [b for w, b in resharded["live"] if w == "after_forward"] == [rest] * n and rest < blocks
        assert [b for w, b in kept["live"] if w == "after_forward"] == [blocks + rest] * n
        assert [b for w, b in resharded["live"] + kept["live"] if w == "after_backward"] == [0] * 2 * n
        # Overlap: every unit gather was launched while the unit before it computed (the first block's behind the
        # embedding's row exchange, the head's behind the last block, re-gathers behind the unit after it).
        assert resharded["gathers"] == {"waited": 0, "prefetched": ACCUM * (2 * CFG.n_layers + 1)}
        assert kept["gathers"] == {"waited": 0, "prefetched": ACCUM * (CFG.n_layers + 1)}
        # Resharded, one unit is materialized at a time (the next one's gather is in flight, into its receive
        # buffer): the head is gathered after the last block's forward and reduced before its re-gather.
        assert resharded["peak"] == max(rest, blocks // CFG.n_layers) and kept["peak"] == blocks + rest


def test_bf16_and_fp8_gathers(pool):
    res = pool.run(dtype_runs, "sltrain", layout=LAYOUT[4])
    bounds = grad_bounds([r[0] for r in res])
    for dp_res, fp32, bf16, fp8, rs_bf16 in res:
        assert_same_training(dp_res, fp32, exact=False, bounds=bounds)
        g32, g16, g8 = (r["comm"][0]["dp_cp/all_gather"] for r in (fp32, bf16, fp8))
        assert g16 * 2 == g32
        # FP8: one byte per element and a 4-byte scale per 1x128 group of each shard: 1/4 plus 1/128.
        assert g32 / 4 < g8 <= g32 / 4 * (1 + 1 / 32) + 64
        assert rs_bf16["comm"][0]["dp_cp/reduce_scatter"] * 2 == fp32["comm"][0]["dp_cp/reduce_scatter"]
        # Tolerances, about 5x what was measured (sltrain, dp=4; in brackets): losses relative to the fp32 run
        # (bf16 weights 6e-5, FP8 weights 8e-4, bf16 gradients 3e-5), first-step gradients relative to each
        # tensor's scale (7e-3, 0.15, 6e-3) and the mean parameter difference after 3 AdamW steps of lr 1e-2
        # (2e-4, 2e-3, 1.3e-4); the max difference is not a useful bound: AdamW moves an element whose
        # gradient nearly cancels by about lr whatever the gradient's size.
        for r, (loss_tol, grad_tol, param_tol) in (
            (bf16, (5e-4, 3e-2, 1e-3)),
            (fp8, (5e-3, 0.5, 1e-2)),
            (rs_bf16, (5e-4, 3e-2, 1e-3)),
        ):
            assert r["losses"] != fp32["losses"]  # it did run in low precision
            torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(dp_res["losses"]), rtol=loss_tol, atol=0)
            for name, g in dp_res["grads"].items():
                close(r["grads"][name], g, grad_tol, f"grad {name}")
            for name, t in dp_res["params"].items():
                if t.is_floating_point():
                    assert (r["params"][name] - t).abs().mean() < param_tol, name


def test_heterogeneous_sharding(pool):
    # Nodes of 2 ranks: the 8x64 / 64x8 factors (512 elements) are replicated in a node, sharded over 2 nodes;
    # the embedding is gathered whole with the rest-unit here (sparse_embedding=False).
    kw = dict(node_size=2, replicate_below=600, sparse_embedding=False)
    res = pool.run(heterogeneous_runs, "lowrank", kw, layout=LAYOUT[4])
    bounds = grad_bounds([r[0] for r in res])
    for dp_res, fs_res, per_micro in res:
        assert_same_training(dp_res, per_micro, exact=False, bounds=bounds)
        assert (
            per_micro["comm"][0]["dp_cp_cross/reduce_scatter"]
            == ACCUM * per_micro["comm"][0]["dp_cp_node/all_reduce"] * 2
        )
        assert not fs_res["sparse"] and "tok_embeddings.weight" in fs_res["specs"]
        assert_same_training(dp_res, fs_res, exact=False, bounds=bounds)
        hybrid = [n for n, (kind, _) in fs_res["specs"].items() if kind == "hybrid"]
        assert hybrid and all(fs_res["specs"][n][1] < 600 for n in hybrid)
        assert any(kind == "shard" for kind, _ in fs_res["specs"].values())
        for n in hybrid:
            assert math.prod(fs_res["shards"][n]) * 2 == dp_res["sizes"][n]  # 1/n_nodes
        step = fs_res["comm"][0]
        hybrid_bytes = F32 * sum(fs_res["specs"][n][1] for n in hybrid)
        assert all(n.startswith("layers.") for n in hybrid)
        assert step["dp_cp_cross/all_gather"] == ACCUM * 2 * hybrid_bytes  # block tensors: forward and backward
        assert step["dp_cp_cross/reduce_scatter"] == hybrid_bytes  # deferred: once per step
        assert step["dp_cp_node/all_reduce"] == hybrid_bytes // 2  # this node's summed half


def test_checkpoint_round_trip_is_exact(pool, tmp_path):
    res = pool.run(checkpoint_round_trip, "sltrain", str(tmp_path), layout=LAYOUT[4])
    for r in res:
        assert r["single_sd"].keys() == r["sd"].keys()
        assert all(torch.equal(r["single_sd"][k], v) for k, v in r["sd"].items())
        for n, st in r["osd"].items():
            assert all(
                torch.equal(r["single_osd"][n][k], v) if torch.is_tensor(v) else r["single_osd"][n][k] == v
                for k, v in st.items()
            ), n
        for other in ("2", "3"):
            assert all(torch.equal(r["shards" + other][n], t) for n, t in r["shards1"].items())
            for n, st in r["st1"].items():
                assert all(torch.equal(r["st" + other][n][k], v) for k, v in st.items()), (other, n)
        assert r["l1"] == r["l2"]
        assert all(torch.equal(r["after2"][k], v) for k, v in r["after1"].items())
        assert any(v.dtype == torch.uint8 for st in r["osd"].values() for v in st.values() if torch.is_tensor(v))
    assert all(torch.equal(res[0]["sd"][k], r["sd"][k]) for r in res[1:] for k in r["sd"])  # every rank the same


def test_tensor_parallel_underneath(pool):
    res = pool.run(tensor_parallel_runs, "lost", layout=dict(tp=2, dp=2))
    for dp_res, fs_res in res:
        assert_same_training(dp_res, fs_res, exact=True)
        assert_bytes(dp_res, fs_res)
    assert all(
        torch.equal(t, res[1][1]["params"][n]) for n, t in res[0][1]["params"].items()
    )  # tp peers: one logical model


def test_group_of_one_is_a_no_op():
    dims = ParallelDims(tp=1, cp=1, dp=1, pp=1, world_size=1)
    model = build("lowrank")
    before = dict(model.named_parameters())
    fs = FSSDP(model, dims)
    assert not fs.enabled and "no-op" in fs.describe() and fs.specs == {}
    assert all(p is before[n] for n, p in model.named_parameters())
    x, y = batch(dims, 0, 0)
    loss_sum(model, dims, x, y).backward()
    fs.finish()
    assert dims.comm_stats.snapshot() == {} and fs.bytes_gathered_last_step == 0
    assert fs.logical_state_dict().keys() == model.state_dict().keys()


def test_sharding_rule_keeps_groups_whole():
    assert dim0_bounds((64, 512), 4) == [(0, 16), (16, 32), (32, 48), (48, 64)]  # C >= 128: any row
    assert dim0_bounds((64, 32), 4) == [(0, 16), (16, 32), (32, 48), (48, 64)]  # 4 rows per group
    assert dim0_bounds((10, 64), 4) == [(0, 4), (4, 6), (6, 8), (8, 10)]  # 2 rows per group, 5 blocks
    assert dim0_bounds((409,), 4) == [(0, 128), (128, 256), (256, 384), (384, 409)]  # 1-D: 128 elements
    assert dim0_bounds((300,), 4) is None and dim0_bounds((64,), 2) is None  # too few groups: replicated
    assert dim0_bounds((16, 8), 2) is None  # one group of 16 rows x 8
    assert dim0_bounds((4, 3, 40), 2) == [(0, 2), (2, 4)]  # 3 rows per dim-0 index, 3 rows per group


def test_construction_shards_and_marks_without_communicating():
    # Building the layout sends nothing, so rank 1 of a dp=2 group can be inspected in-process.
    dims = ParallelDims(tp=1, cp=1, dp=2, pp=1, world_size=2, rank=1)
    model = build("lost")
    fs = FSSDP(model, dims)
    p = dict(model.named_parameters())
    a = p["layers.0.attention.q.A"]  # 8 x 64: 2 rows per FP8 group, 4 groups, 2 per rank
    am = param_meta(a)
    assert tuple(a.shape) == (4, 64) and am.logical_shape == (8, 64) and (am.dp_split, am.dp_replicas) == ("rows", 1)
    assert tuple(p["layers.0.attention.q.sparse_weight"].shape) == (32, 16)  # 64 x 16: 8 rows per group
    assert torch.equal(a.detach(), build("lost").layers[0].attention.q.A.detach()[4:8])  # rank 1's rows of the seed's
    norm = p["norm.weight"]
    nm = param_meta(norm)
    assert tuple(norm.shape) == (64,) and (nm.dp_split, nm.dp_replicas) == ("replicated", 2)
    assert [r.spec.name for r in fs.sparse_rows] == ["tok_embeddings.weight"]
    assert all(b.dtype == torch.int32 for n, b in model.named_buffers() if n.endswith("channel_index"))  # indices stay
    assert "units over dp_cp (2 ranks)" in fs.describe()


def test_bad_arguments_fail_clearly():
    dims = ParallelDims(tp=1, cp=1, dp=4, pp=1, world_size=4, rank=0)
    with pytest.raises(ValueError, match="materialized"):
        FSSDP(build_llama(CFG, MethodConfig(name="dense"), device="meta"), dims)
    with pytest.raises(ValueError, match="gather dtype"):
        FSSDP(build("dense"), dims, gather_dtype="fp16")
    with pytest.raises(ValueError, match="node_size 3 does not divide"):
        FSSDP(build("dense"), dims, node_size=3)
    tied = build("dense")
    tied.layers[1].attention.q.weight = tied.layers[0].attention.q.weight
    with pytest.raises(ValueError, match="shared by two units"):
        FSSDP(tied, dims)

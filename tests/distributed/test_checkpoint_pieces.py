"""The boxes sharded checkpoints write (`local_pieces`, megaeff/distributed/logical_state.py and fssdp/state.py)
against the gathered logical state, on 4 gloo ranks, for every layout.

Each rank builds a tiny LLaMA under the layout from the seed, takes one optimizer step (so the optimizer state,
COAT's FP8 codes and their `*_meta` rows included, is non-trivial), and asks `local_pieces` for every tensor of
its model state dict and optimizer state. It checks on the rank that every view aliases the local tensor, and
returns copies of the boxes; where the answer is None it returns the fallback `gather` instead. It also returns
the existing `gather_model` / `gather_optimizer` (the single-process state). This side then places every rank's
boxes into a zero logical tensor and requires, for every logical tensor of the model and of the optimizer:
every element covered exactly once (a box repeated on replicas counts once and must hold the same values), and
the result bit-identical to the gathered tensor (which `shard_model` / `shard_optimizer` cut back into exactly
the rank's tensors). A wrong offset, a missing or overlapping box fails that
(`test_the_checker_catches_wrong_boxes`).

Layouts: tp2 x dp2 (replicated over dp, and with FSSDP over dp), each of dense / lowrank / lost / sltrain with
AdamW at widths that are not multiples of 128; the same with COAT FP8 states at a width whose tp shards hold whole
groups; dp4 FSSDP with COAT, heterogeneous (norms sharded across two emulated nodes); MoE experts over dp4,
expert FSSDP and expert parallelism, and expert FSSDP under FSSDP. The vocab-parallel embedding and head come
with every tp layout.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

from megaeff.config.parallel import ParallelConfig
from megaeff.config.schema import MethodConfig, ModelConfig, OptimConfig
from megaeff.distributed.logical_state import annotate_parameters
from megaeff.distributed.optimizer_state import optimizer_state_by_name
from megaeff.distributed.parallelize import apply_data_parallel, apply_tensor_parallel
from megaeff.distributed.tensor_parallel.sequence import loss_sum as parallel_loss_sum
from megaeff.models.init import materialize
from megaeff.models.llama import build_llama
from megaeff.optim.builder import build_optimizer
from tests.distributed.harness import pool_fixture

pool = pool_fixture(4)

METHODS = {
    "dense": dict(name="dense"),
    "lowrank": dict(name="lowrank", rank=8),
    "lost": dict(name="lost", rank=8, lost_channel_ratio=0.25),
    "sltrain": dict(name="sltrain", rank=8, density=0.1),
}
OPTIMS = {
    "adamw": OptimConfig(name="adamw", lr=1e-2, eps=1e-6, impl="foreach"),
    # Every tensor in FP8 (norm gains too): 1-D metadata, ragged groups of 136- and 200-wide rows.
    "coat": OptimConfig(name="coat_adamw", lr=1e-2, eps=1e-6, min_fp8_numel=0, fp8_backend="torch"),
    # GaLore's projector is computed on every rank from the all-reduced gradient (seeded sketch and head draw):
    # the replicas' boxes must be equal, which `assemble` checks.
    "galore": OptimConfig(
        name="galore", lr=1e-2, eps=1e-6, galore_rank=8, galore_projector="randomized", galore_cross_head=True
    ),
}
ODD = dict(dim=96, ffn_dim=160, n_heads=2, n_layers=1, vocab_size=130, max_seq_len=16)  # no multiple of 128
# tp2 + COAT: the row-parallel shards' columns must be whole 128-groups (the optimizer refuses otherwise).
WIDE = dict(dim=256, ffn_dim=512, n_heads=2, n_layers=1, vocab_size=130, max_seq_len=16)
RAGGED = dict(dim=136, ffn_dim=200, n_heads=2, n_layers=1, vocab_size=130, max_seq_len=16)
MOE = dict(dim=40, ffn_dim=64, n_heads=2, n_layers=1, vocab_size=64, max_seq_len=16, moe_experts=4, moe_ffn_dim=24)
TP2 = dict(tp=2, dp=2)
DP4 = dict(dp=4)
CASES = {
    "tp2_dp2": (TP2, dict(model=ODD, methods=list(METHODS), optim="adamw")),
    "tp2_fssdp2": (TP2, dict(model=ODD, methods=list(METHODS), optim="adamw", dp_impl="fssdp")),
    "tp2_dp2_coat": (TP2, dict(model=WIDE, methods=["dense", "lowrank", "lost"], optim="coat")),
    "tp2_fssdp2_coat": (TP2, dict(model=WIDE, methods=["dense", "lowrank", "lost"], optim="coat", dp_impl="fssdp")),
    "dp4_fssdp_coat": (
        DP4,
        dict(model=RAGGED, methods=list(METHODS), optim="coat", dp_impl="fssdp", fssdp_node_size=2),
    ),
    "dp4_galore": (DP4, dict(model=ODD, methods=["dense"], optim="galore")),
    "experts_fssdp_dp4": (DP4, dict(model=MOE, methods=["dense", "sltrain"], optim="adamw", expert_impl="fssdp")),
    "experts_ep_dp4": (DP4, dict(model=MOE, methods=["dense", "sltrain"], optim="adamw", expert_impl="ep")),
    "experts_fssdp_in_fssdp_dp4": (
        DP4,
        dict(model=MOE, methods=["lowrank"], optim="adamw", expert_impl="fssdp", dp_impl="fssdp"),
    ),
}


# ----------------------------------------------------------------------------------------------- on every rank
def portable(t: torch.Tensor) -> torch.Tensor:
    """A detached copy; FP8 codes as their bytes (compared bit for bit)."""
    t = t.detach()
    return (t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t).clone()


def aliases(view: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether `view` lies in `tensor`'s own bytes (a load writing the view writes the tensor)."""
    if view.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr():
        return False
    lo, hi = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    return lo <= view.data_ptr() and view.data_ptr() + view.numel() * view.element_size() <= hi


def build(dims, method: str, case: Dict):
    cfg = ModelConfig(name="pieces", **case["model"])
    model = build_llama(cfg, MethodConfig(**METHODS[method]), device="meta")
    if dims.tp > 1:
        apply_tensor_parallel(model, dims)
    model = materialize(model, torch.device("cpu"), 0, 0.02)
    annotate_parameters(model)
    pcfg = ParallelConfig(
        dp_impl=case.get("dp_impl", "allreduce"),
        expert_impl=case.get("expert_impl", "replicated"),
        fssdp_node_size=case.get("fssdp_node_size", 0),
        bucket_mb=0.01,
    )
    pm = apply_data_parallel(model, dims, pcfg, moe=bool(cfg.moe_experts))
    opt, _ = build_optimizer(pm.module, OPTIMS[case["optim"]], dims.device, None)
    g = torch.Generator().manual_seed(100 + dims.dp_rank)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    logits = pm.module(tokens[:, :-1])
    if dims.tp > 1:
        loss = parallel_loss_sum(logits, tokens[:, 1:], dims)
    else:
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    pm.grad_sync.prepare(final=True)
    (loss / (dims.dp * tokens[:, 1:].numel())).backward()
    pm.grad_sync.finish()
    opt.step()
    return pm, opt


def collect(dims, pm, opt) -> Dict:
    """This rank's boxes (copies) by (logical name, state key), the (name, key) answered None with their fallback
    gather, and the gathered logical state."""
    state, model = pm.state, pm.module
    saved = optimizer_state_by_name(model, opt)
    tensors = [(n, "", v) for n, v in model.state_dict().items()]
    tensors += [(n, k, v) for n, st in saved["state"].items() for k, v in st.items() if torch.is_tensor(v)]
    boxes, fallback = {}, {}
    for name, key, t in tensors:
        got = state.local_pieces(name, key, t)
        if got is None:
            fallback[(name, key)] = portable(state.gather(name, t, key))  # a collective, the same order everywhere
            continue
        assert set(got) <= set(state.local_logical_names(name)) | {name}, (name, sorted(got)[:3])
        for lname, pieces in got.items():
            for offsets, view in pieces.chunks:
                assert aliases(view, t), f"{lname} {key}: a box at {offsets} does not alias the local tensor"
                assert len(offsets) == view.dim() == len(pieces.logical_shape), (lname, key, offsets)
            assert (lname, key) not in boxes, f"{lname} {key}: two local tensors answer for it"
            boxes[(lname, key)] = (tuple(pieces.logical_shape), [(o, portable(v)) for o, v in pieces.chunks])
    for lname, t in state.logical_buffers().items():
        boxes[(lname, "")] = (tuple(t.shape), [((0,) * t.dim(), portable(t))])
    sharded = state.sharded
    logical_model = state.gather_model(model.state_dict()) if sharded else model.state_dict()
    gathered_opt = state.gather_optimizer(saved) if sharded else saved
    logical_opt = gathered_opt["state"]
    if sharded:  # and back, with no communication: this rank's tensors exactly (the fallback's inverse too)
        back = state.shard_model(logical_model)
        assert back.keys() == model.state_dict().keys()
        assert all(torch.equal(portable(back[k]), portable(v)) for k, v in model.state_dict().items())
        back = state.shard_optimizer(gathered_opt)["state"]
        assert back.keys() == saved["state"].keys()
        for n, st in saved["state"].items():
            assert all(torch.equal(portable(back[n][k]), portable(v)) for k, v in st.items()), n
    ref = {(n, ""): portable(v) for n, v in logical_model.items()}
    ref.update({(n, k): portable(v) for n, st in logical_opt.items() for k, v in st.items() if torch.is_tensor(v)})
    return dict(boxes=boxes, fallback=fallback, ref=ref)


def run_case(dims, case: Dict) -> Dict:
    return {method: collect(dims, *build(dims, method, case)) for method in case["methods"]}


# ----------------------------------------------------------------------------------------------- the checker
def assemble(shape, chunks_by_rank: List[list], what: str = "") -> torch.Tensor:
    """The logical tensor of `shape` from every rank's chunks [(offsets, values)]: every element must be
    covered exactly once, a box repeated on several ranks (replicas) counting once with equal values."""
    count = torch.zeros(shape, dtype=torch.int64)
    full, seen = None, {}
    for chunks in chunks_by_rank:
        for offsets, values in chunks:
            box = (tuple(offsets), tuple(values.shape))
            assert len(box[0]) == len(shape), f"{what}: box {box} in a tensor of shape {shape}"
            assert all(0 <= o and o + s <= d for o, s, d in zip(*box, shape)), f"{what}: box {box} outside {shape}"
            if box in seen:
                assert torch.equal(seen[box], values), f"{what}: replicas of box {box} differ"
                continue
            seen[box] = values
            full = torch.zeros(shape, dtype=values.dtype) if full is None else full
            region = tuple(slice(o, o + s) for o, s in zip(*box))
            full[region] = values
            count[region] += 1
    assert full is not None, f"{what}: no rank holds any of it"
    lo, hi = int(count.min()), int(count.max())
    assert lo == hi == 1, f"{what}: elements covered from {lo} to {hi} times"
    return full


def check_layout(results: List[Dict]) -> Dict[str, int]:
    """Every logical tensor assembled from the boxes equals the gathered one; returns counts for the report."""
    ref = results[0]["ref"]
    assert all(r["ref"].keys() == ref.keys() for r in results)
    boxed = set().union(*(r["boxes"] for r in results))
    gathered = set().union(*(r["fallback"] for r in results))
    assert not boxed & gathered, f"boxes on some ranks, None on others: {sorted(boxed & gathered)[:3]}"
    assert boxed | gathered == set(ref), sorted(set(ref) ^ (boxed | gathered))[:5]
    for key in sorted(boxed):
        shapes = {r["boxes"][key][0] for r in results if key in r["boxes"]}
        assert shapes == {tuple(ref[key].shape)}, f"{key}: logical shapes {shapes}, gathered {tuple(ref[key].shape)}"
        full = assemble(ref[key].shape, [r["boxes"][key][1] for r in results if key in r["boxes"]], str(key))
        assert full.dtype == ref[key].dtype and torch.equal(full, ref[key]), f"{key}: boxes differ from the gather"
    for key in gathered:
        assert all(key in r["fallback"] for r in results), f"{key}: None on only some ranks"
        assert all(torch.equal(r["fallback"][key], ref[key]) for r in results), key
    return dict(boxed=len(boxed), gathered=len(gathered))


# ----------------------------------------------------------------------------------------------- tests
def test_the_checker_catches_wrong_boxes():
    """The assertion above on hand-made boxes: two ranks' rows of a 5 x 3 tensor, the second rank's replicated."""
    full = torch.arange(15.0).view(5, 3)
    good = [[((0, 0), full[:2])], [((2, 0), full[2:])], [((2, 0), full[2:])]]
    assert torch.equal(assemble((5, 3), good), full)
    wrong = {
        "off by one": [[((0, 0), full[:2])], [((3, 0), full[2:])]],
        "off by one, inside": [[((0, 0), full[:2])], [((1, 0), full[1:4])], [((4, 0), full[4:])]],
        "a gap": [[((0, 0), full[:2])], [((3, 0), full[3:])]],
        "a partial overlap": [[((0, 0), full[:3])], [((2, 0), full[2:])]],
        "replicas differ": [[((0, 0), full[:2])], [((2, 0), full[2:])], [((2, 0), full[2:] + 1)]],
    }
    for why, boxes in wrong.items():
        with pytest.raises(AssertionError):
            assemble((5, 3), boxes, why)
    # Values in the wrong place cover the tensor exactly once but differ from the gathered tensor.
    shifted = assemble((5, 3), [[((0, 0), full[3:])], [((2, 0), full[:3])]])
    assert not torch.equal(shifted, full)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_boxes_reassemble_the_gathered_state(pool, case):
    layout, spec = CASES[case]
    per_rank = pool.run(run_case, spec, layout=layout)
    for method in spec["methods"]:
        counts = check_layout([r[method] for r in per_rank])
        assert counts["boxed"] > 0, (case, method)
        gathered = {k for k in per_rank[0][method]["fallback"]}
        # The only tensors without a box form: SLTrain's row-parallel sparse values (and their moments), and the
        # COAT metadata of cols-split (row-parallel) parameters.
        for name, key in gathered:
            assert (name.endswith("sparse_values") and (".o." in name or ".down." in name)) or key.endswith("_meta"), (
                case,
                method,
                name,
                key,
            )
        if method == "sltrain" and layout == TP2:
            assert any(n.endswith("sparse_values") for n, _ in gathered)
        if spec["optim"] == "coat" and layout == TP2:
            assert any(k.endswith("_meta") for _, k in gathered)

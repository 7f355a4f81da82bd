"""The experts of a MoE layer spread over the dp x cp group: expert FSSDP (Hecate) and, as the baseline, expert
parallelism with a fixed placement.

Both replace a `MoE` (megaeff/models/moe.py) by a module with the same contract, x [B, T, dim] -> [B, T, dim].
The router stays an ordinary replicated parameter (`router.weight`, reduced over dp like any other); the experts
live in one flat parameter per layer:

- `ExpertFSSDP.expert_shards` [E, S]: rank o holds elements [o S, (o+1) S) of every expert's flat vector, so
  parameters and optimizer state are 1/p of the layer on every rank, whatever the routing.
- `ExpertParallel.expert_params` [n_owned, P]: rank o holds the whole flat vector of every expert e = o mod p.

Flat vector of an expert: its parameters in `named_parameters` order, each starting at a multiple of 128 elements,
padded to a multiple of 128 p (FSSDP) or 128 (EP). A shard boundary thus falls on a multiple of 128 of every
tensor's own elements and splits no 1x128 FP8 group of a tensor whose last dimension is a multiple of 128.
Buffers (SLTrain supports, LOST channels) stay on every rank in per-expert template modules, as everywhere in
megaeff they are regenerated from the seed and never communicated.

One forward, on every rank of the group:
1. Plan. Each rank routes its own tokens and all-gathers its counts C[s, e] (E integers). Their column sums are
   the all-reduced loads; the whole table also lets every rank compute every split size, so none is exchanged.
   From C every rank computes the same placement and the same table of rows that source s sends to replica j
   of expert e: the global rows of e (ordered by source rank, then by position) are cut into r_e equal ranges.
2. Materialize (FSSDP only; SparseAllGather): one uneven all_to_all_single in which owner o sends, to each d,
   its shards of the experts d hosts; d reassembles them. EP's experts are local and nothing moves.
3. Dispatch: one uneven all_to_all of the token rows to their replicas; each hosted expert runs once on its rows
   in (source, position) order; the reverse all_to_all brings the results back to their (token, slot) places,
   and the gated sum over slots is MoE's own `combine`.
Backward is one autograd node with a fixed collective order on every rank: the gradients of the results go to
the hosts, the experts' backward runs, the row gradients return, and (FSSDP; SparseReduceScatter) host d sends
owner o the slice o of each hosted expert's gradient; o sums the replicas in host-rank order, so the result is
deterministic. With `rematerialize` (the default) the gathered experts and their activations are freed after
forward and rebuilt in backward by a second SparseAllGather and a second expert forward; without it both stay
alive until backward.

Placement and the per-step exchange plan are in placement.py.

Equality with the single-process MoE: identical routing, rows and combine order; what differs is the batch each
matmul sees and, for a replicated expert, the order in which its replicas' gradients are summed: 1e-10 in
float64 covers both. Per step (`last_stats`): the loads, the placement, the rows each rank processes and the
straggler measure max / mean of them, and the elements that leave their rank in each exchange.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Mapping, Tuple

import torch
from torch import nn
from torch.func import functional_call

from megaeff.distributed.chunk_boxes import Pieces, flat_range_pieces
from megaeff.distributed.comm import all_gather, all_to_all_uneven
from megaeff.distributed.expert_parallel.placement import StepPlan, fixed_placement, plan_placement
from megaeff.layers.param_meta import ParamMeta, set_param_meta
from megaeff.models.moe import MoE, balance_loss, combine, inverse_permutation, route_tokens, sort_assignments

if TYPE_CHECKING:
    from megaeff.distributed.dims import ParallelDims

ALIGN = 128


def _ceil_to(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class FlatLayout:
    """Where each parameter of an expert lies in its flat vector (see the module docstring)."""

    def __init__(self, expert: nn.Module, world: int):
        self.entries: List[Tuple[str, Tuple[int, ...], int, int]] = []
        offset = 0
        for name, p in expert.named_parameters():
            self.entries.append((name, tuple(p.shape), offset, p.numel()))
            offset += _ceil_to(p.numel(), ALIGN)
        self.padded = max(ALIGN * world, _ceil_to(offset, ALIGN * world))
        self.shard = self.padded // world

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        first = next(iter(tensors.values()))
        flat = torch.zeros(self.padded, dtype=first.dtype, device=first.device)
        for name, _, offset, numel in self.entries:
            flat[offset : offset + numel] = tensors[name].reshape(-1)
        return flat

    def views(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {name: flat[offset : offset + numel].view(shape) for name, shape, offset, numel in self.entries}


class _ExpertExchange(torch.autograd.Function):
    """Dispatch, expert compute and combine as one node, so that every rank runs the backward collectives in
    the same fixed order (two independent autograd nodes holding collectives could be run in either order)."""

    @staticmethod
    def forward(ctx, x_send, param, layer, plan, keep_graph):
        cg = layer.cg
        rows = all_to_all_uneven(x_send, cg, plan.send_splits, plan.recv_splits)
        flats = layer._materialize(param, plan)
        if not keep_graph:
            y = layer._compute(rows, flats, plan)
            ctx.save_for_backward(rows, param)
        else:
            with torch.enable_grad():
                rows_in, leaves = rows.detach().requires_grad_(), [f.detach().requires_grad_() for f in flats]
                y_graph = layer._compute(rows_in, leaves, plan)
            ctx.graph = (rows_in, leaves, y_graph)
            y = y_graph.detach()
        ctx.layer, ctx.plan, ctx.keep_graph = layer, plan, keep_graph
        return all_to_all_uneven(y, cg, plan.recv_splits, plan.send_splits)

    @staticmethod
    def backward(ctx, dy_send):
        layer, plan = ctx.layer, ctx.plan
        dy = all_to_all_uneven(dy_send.contiguous(), layer.cg, plan.send_splits, plan.recv_splits)
        if not ctx.keep_graph:
            rows, param = ctx.saved_tensors
            flats = layer._materialize(param, plan)
            with torch.enable_grad():
                rows_in, leaves = rows.detach().requires_grad_(), [f.detach().requires_grad_() for f in flats]
                y = layer._compute(rows_in, leaves, plan)
        else:
            rows_in, leaves, y = ctx.graph
            del ctx.graph
        inputs = [rows_in, *leaves]
        grads = torch.autograd.grad(y, inputs, dy, allow_unused=True) if y.requires_grad else [None] * len(inputs)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
        dx_send = all_to_all_uneven(grads[0], layer.cg, plan.recv_splits, plan.send_splits)
        return dx_send, layer._reduce(grads[1:], plan), None, None, None


class _DistributedExperts(nn.Module):
    kind = ""
    flat_param_name = ""
    rematerialize = False

    def __init__(self, moe: MoE, dims: ParallelDims, group: str, pad_world: int):
        super().__init__()
        if any(p.is_meta for p in moe.parameters()):
            raise ValueError("materialize and initialize the MoE before distributing its experts")
        self.cg = dims.comm(group)
        self.world, self.rank = self.cg.size, self.cg.rank
        self.n_experts, self.top_k, self.dim = moe.n_experts, moe.top_k, moe.dim
        self.aux_loss_coef, self.prefix = moe.aux_loss_coef, moe.prefix
        self.router = moe.router
        self.router_override = moe.router_override
        self.aux_loss = self.last_loads = self.last_stats = None
        experts = list(moe.experts)
        self.layout = FlatLayout(experts[0], pad_world)
        with torch.no_grad():
            self._logical = torch.stack([self.layout.flatten(dict(x.named_parameters())) for x in experts])
        for module in (m for x in experts for m in x.modules()):
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        # A plain list: the templates carry buffers and the compute, their parameters come from the flat one.
        self._templates = experts

    def _adopt(self, value: torch.Tensor) -> None:
        param = nn.Parameter(value.clone())
        # For the consumers that see parameters only (dp reduction, clipping): distinct on every dp x cp rank.
        set_param_meta(param, ParamMeta(logical_shape=tuple(param.shape), expert=True))
        self.register_parameter(self.flat_param_name, param)
        del self._logical

    def flat_param(self) -> nn.Parameter:
        return getattr(self, self.flat_param_name)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for t in self._templates:
            t._apply(fn)
        return self

    # ------------------------------------------------------------------ logical views (tests, checkpoints)
    def logical_names(self) -> List[str]:
        return [f"{self.prefix}.experts.{e}.{name}" for e in range(self.n_experts) for name, *_ in self.layout.entries]

    def gather_logical(self, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Logical expert tensors by global name from a tensor shaped like the flat parameter (its value, its
        gradient or an optimizer state); a collective over the group."""
        full = self.gather_flat(tensor)
        return {
            f"{self.prefix}.experts.{e}.{name}": v.clone()
            for e in range(self.n_experts)
            for name, v in self.layout.views(full[e]).items()
        }

    def logical_buffers(self) -> Dict[str, torch.Tensor]:
        """The experts' persistent buffers (index checksums) under their logical names: the single-process model
        holds them in its state dict, these modules in the per-expert templates."""
        out = {}
        for e, template in enumerate(self._templates):
            params = dict(template.named_parameters())  # meta placeholders: the values live in the flat parameter
            state = template.state_dict()
            out.update({f"{self.prefix}.experts.{e}.{k}": v for k, v in state.items() if k not in params})
        return out

    def local_pieces(self, tensor: torch.Tensor) -> Dict[str, Pieces]:
        """The boxes of the logical expert tensors that `tensor` (shaped like the flat parameter: its value or an
        optimizer state; or a scalar, which every logical tensor shares) holds here, each a view of it. Each
        local row is a run [a, b) of one expert's flat vector (`_local_runs`); its overlap with a tensor's
        elements is a run of that tensor's flattening, i.e. a few boxes (chunk_boxes.flat_range_boxes).
        Padding is in no box."""
        if tensor.dim() == 0:
            return {n: Pieces((), [((), tensor)]) for n in self.logical_names()}
        if tensor.shape != self.flat_param().shape:
            raise ValueError(f"{self.prefix}: a {tuple(tensor.shape)} tensor is not shaped like the experts' flat")
        out = {
            f"{self.prefix}.experts.{e}.{name}": Pieces(shape, [])
            for e in range(self.n_experts)
            for name, shape, *_ in self.layout.entries
        }
        for row, e, a, b in self._local_runs():
            for name, shape, offset, numel in self.layout.entries:
                lo, hi = max(a, offset), min(b, offset + numel)
                if lo < hi:
                    chunks = out[f"{self.prefix}.experts.{e}.{name}"].chunks
                    chunks += flat_range_pieces(shape, lo - offset, hi - offset, tensor[row, lo - a : hi - a])
        return out

    def shard_logical(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This rank's part of logical expert tensors (the inverse of `gather_logical`, no communication)."""
        full = torch.stack(
            [
                self.layout.flatten(
                    {name: state[f"{self.prefix}.experts.{e}.{name}"] for name, *_ in self.layout.entries}
                )
                for e in range(self.n_experts)
            ]
        )
        return self.shard_flat(full)

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], self.top_k
        flat = x.reshape(-1, self.dim)
        r = route_tokens(flat, self.router.weight, k, self.router_override)
        order, local = sort_assignments(r.experts, self.n_experts)
        counts = all_gather(local.view(1, -1), self.cg, 0)
        loads = counts.sum(0)
        plan = StepPlan(
            counts.tolist(), self._placement(loads.tolist()), self.rank, self.layout.shard, self.kind == "fssdp"
        )
        pos = order[plan.send_perm.to(order.device)]
        # Without re-materialization the experts' graph is kept for backward, unless there will be no backward.
        keep = not self.rematerialize and torch.is_grad_enabled()
        y_send = _ExpertExchange.apply(flat[pos // k], self.flat_param(), self, plan, keep)
        out = combine(y_send[inverse_permutation(pos)], r.gates)
        self.last_loads, self.last_stats = loads, plan.stats
        # This rank's share of the global batch's balance loss: the shares (and their gradients) sum to it.
        self.aux_loss = (
            self.aux_loss_coef * balance_loss(r.probs.sum(0), loads, int(loads.sum()) // k, k)
            if self.aux_loss_coef
            else None
        )
        return out.view(*lead, self.dim)

    def _compute(self, rows: torch.Tensor, flats: List[torch.Tensor], plan: StepPlan) -> torch.Tensor:
        chunks = rows[plan.group_perm.to(rows.device)].split(plan.expert_rows)
        outs = [
            functional_call(self._templates[e], self.layout.views(flat), (chunk,))
            for e, flat, chunk in zip(plan.hosted_here, flats, chunks)
            if chunk.shape[0]
        ]
        y = torch.cat(outs) if outs else rows.new_zeros(0, self.dim)
        return y[plan.group_inv.to(rows.device)]

    def extra_repr(self) -> str:
        return f"{self.kind}: experts={self.n_experts}, top_k={self.top_k}, group={self.cg.name} of {self.world}"


class ExpertFSSDP(_DistributedExperts):
    """Expert FSSDP: shards everywhere, experts materialized only where this step's placement puts them."""

    kind = "fssdp"
    flat_param_name = "expert_shards"

    def __init__(
        self, moe: MoE, dims: ParallelDims, *, group: str = "dp_cp", slots_per_rank: int = 0, rematerialize: bool = True
    ):
        world = dims.size(group)
        super().__init__(moe, dims, group, world)
        self.slots = slots_per_rank or min(self.n_experts, -(-self.n_experts // world) + 1)
        if not 1 <= self.slots <= self.n_experts or self.slots * world < self.n_experts:
            raise ValueError(f"slots_per_rank={self.slots} cannot host {self.n_experts} experts on {world} ranks")
        self.rematerialize = rematerialize
        s = self.layout.shard
        self._adopt(self._logical[:, self.rank * s : (self.rank + 1) * s])

    def _placement(self, loads):
        return plan_placement(loads, self.world, self.slots)

    def _local_runs(self) -> List[Tuple[int, int, int, int]]:
        """(local row, expert, start, stop): row e holds elements [rank S, (rank + 1) S) of expert e's flat."""
        s = self.layout.shard
        return [(e, e, self.rank * s, (self.rank + 1) * s) for e in range(self.n_experts)]

    def _materialize(self, shards: torch.Tensor, plan: StepPlan) -> List[torch.Tensor]:
        """SparseAllGather: owner o sends d its shards of the experts d hosts; d stitches them in owner order."""
        hosted, s = plan.placement.hosted, self.layout.shard
        send = torch.cat([shards[list(h)].reshape(-1) for h in hosted])
        n_here = len(plan.hosted_here)
        recv = all_to_all_uneven(
            send, self.cg, [len(h) * s for h in hosted], [n_here * s] * self.world, kind="sparse_all_gather"
        )
        full = recv.view(self.world, n_here, s).transpose(0, 1).reshape(n_here, self.world * s)
        return list(full.unbind(0))

    def _reduce(self, grads: List[torch.Tensor], plan: StepPlan) -> torch.Tensor:
        """SparseReduceScatter: slice o of each hosted expert's gradient to owner o, summed in host-rank order."""
        hosted, s = plan.placement.hosted, self.layout.shard
        n_here = len(plan.hosted_here)
        ref = self.flat_param()
        send = torch.stack(grads).view(n_here, self.world, s).transpose(0, 1).reshape(-1) if grads else ref.new_zeros(0)
        recv = all_to_all_uneven(
            send, self.cg, [n_here * s] * self.world, [len(h) * s for h in hosted], kind="sparse_reduce_scatter"
        )
        out = torch.zeros_like(ref)
        for h, piece in zip(hosted, recv.split([len(h) * s for h in hosted])):
            if h:
                out[list(h)] += piece.view(len(h), s)
        return out

    def gather_flat(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_gather(tensor, self.cg, 1)

    def shard_flat(self, full: torch.Tensor) -> torch.Tensor:
        s = self.layout.shard
        return full[:, self.rank * s : (self.rank + 1) * s].clone()


class ExpertParallel(_DistributedExperts):
    """The baseline: expert e lives whole on rank e mod p, and tokens travel to it."""

    kind = "ep"
    flat_param_name = "expert_params"

    def __init__(self, moe: MoE, dims: ParallelDims, *, group: str = "dp_cp"):
        super().__init__(moe, dims, group, 1)
        self.owned = [e for e in range(self.n_experts) if e % self.world == self.rank]
        self._fixed = fixed_placement(self.n_experts, self.world)
        self._adopt(self._logical[self.owned])

    def _placement(self, loads):
        return self._fixed

    def _local_runs(self) -> List[Tuple[int, int, int, int]]:
        """(local row, expert, start, stop): row j holds the whole flat vector of expert owned[j]."""
        return [(j, e, 0, self.layout.padded) for j, e in enumerate(self.owned)]

    def _materialize(self, params: torch.Tensor, plan: StepPlan) -> List[torch.Tensor]:
        return list(params.unbind(0))

    def _reduce(self, grads: List[torch.Tensor], plan: StepPlan) -> torch.Tensor:
        return torch.stack(grads) if grads else torch.zeros_like(self.flat_param())

    def gather_flat(self, tensor: torch.Tensor) -> torch.Tensor:
        most = -(-self.n_experts // self.world)
        padded = tensor.new_zeros(most, self.layout.padded)
        padded[: tensor.shape[0]] = tensor
        every = all_gather(padded, self.cg, 0)
        return torch.stack([every[(e % self.world) * most + e // self.world] for e in range(self.n_experts)])

    def shard_flat(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.owned].clone()


IMPLS = {"fssdp": ExpertFSSDP, "ep": ExpertParallel}


def parallelize_experts(
    model: nn.Module, dims: ParallelDims, impl: str = "fssdp", group: str = "dp_cp", **options
) -> Dict[str, nn.Module]:
    """Replace every MoE of an initialized `model` in place by its `impl` (ParallelConfig.expert_impl: fssdp |
    ep) over `group`; returns the new modules by path. `options` go to the constructor (FSSDP: slots_per_rank,
    rematerialize)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown expert_impl {impl!r}; available: {', '.join(IMPLS)}")
    done = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, MoE):
            parent_path, _, leaf = path.rpartition(".")
            wrapped = IMPLS[impl](module, dims, group=group, **options)
            setattr(model.get_submodule(parent_path) if parent_path else model, leaf, wrapped)
            done[path] = wrapped
    return done

"""The plan: enumerate, order by a lower bound on step time, measure until the top N are known.

Search (branch and bound). Every valid candidate gets a lower bound on its step time that needs no
measurement: compute + bubble (communication taken as free; cost.lower_bound). Candidates are measured in
increasing order of that bound; once N feasible layouts are known and the next bound is no better than the N-th
step time, no unmeasured layout can enter the top N, and the rest are rejected as "slower" with their bound.
Memory rules that skip a measurement (each stated in the rejection):
- a layout whose weights and AdamW moments alone (`state_floor`, a lower bound) exceed the budget;
- a layout with `optim.in_backward=true` is measured only when the same layout without it is out of memory
  (the switch only saves memory; the step time of the cost model is the same);
- out of memory at micro-batch b implies out of memory at every larger micro-batch of the same layout, and
  with activation checkpointing on implies it with it off (both only add activations).
The memory budget of a rank is the GPU's memory less `headroom` (a fraction held back for what the tracker does
not count: the CUDA context, NCCL's buffers, cuBLAS workspaces, the caching allocator's fragmentation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megaeff.config.compose import compose
from megaeff.config.optim import uses_fp8_states
from megaeff.config.schema import Config
from megaeff.errors import ConfigError
from megaeff.train.planner.cluster import Cluster
from megaeff.train.planner.cost import Cost, FlopCounter, lower_bound, step_cost
from megaeff.train.planner.enumerate import Layout, Options, enumerate_layouts
from megaeff.train.planner.measure import Measurer, RankCost


@dataclass
class Candidate:
    layout: Layout
    bound_s: float
    ranks: List[RankCost] = field(default_factory=list)
    cost: Optional[Cost] = None

    @property
    def peak(self) -> int:
        return max(r.peak for r in self.ranks)


@dataclass
class Plan:
    base: List[str]  # the plan's base overrides (model, method, --set, seq_len)
    cluster: Cluster
    global_batch: int
    efficiency: float
    budget_bytes: int
    top: List[Candidate]
    feasible: List[Candidate]
    rejected: List[Tuple[Layout, str, str]]  # (layout, group, reason)
    enumerated: int
    measured: int
    fake_steps: int
    seconds: float


def base_overrides(model: str, method: str, sets: Sequence[str], seq_len: int) -> List[str]:
    return [f"model={model}", f"method={method}", *sets, f"data.seq_len={seq_len}"]


def _oom_implied(layout: Layout, ooms: Dict[Layout, int]) -> Optional[str]:
    norm = replace(layout, micro_batch=1, grad_accum=1, in_backward=False)
    for ac in (layout.activation_checkpointing, True):
        mb = ooms.get(replace(norm, activation_checkpointing=ac))
        if mb is not None and layout.micro_batch >= mb and (ac or not layout.activation_checkpointing):
            return (
                f"out of memory: the same layout at micro-batch {mb}" + (" with activation checkpointing" * ac) + " is"
            )
    return None


def state_floor(cfg: Config, n_params: int, layout: Layout) -> int:
    """A lower bound on a rank's bytes without measuring: its share of the weights and the AdamW moments (fp32 or
    bf16 weights; two fp32 or, with COAT, two FP8 moments per element). Every parameter is split over tp and pp
    (the largest stage holds at least the average) and, under FSSDP, over dp x cp; gradients, activations and
    the replicated norms only add to it."""
    weight = 2 if cfg.precision.param_dtype == "bf16" else 4
    moments = 2 if uses_fp8_states(cfg.optim, cfg.precision) else 8
    shards = layout.tp * layout.pp * (layout.dp * layout.cp if layout.dp_impl == "fssdp" else 1)
    return n_params * (weight + moments) // shards


def memory_reason(layout: Layout, fits: set, ooms: Dict[Layout, int]) -> Optional[str]:
    """Why `layout` need not be measured (module docstring), given the layouts that fit and, per layout at
    micro-batch 1 without in_backward, the smallest micro-batch found out of memory; None: measure it."""
    if layout.in_backward and replace(layout, in_backward=False) in fits:
        return "the same layout without optim.in_backward fits (the switch only saves memory)"
    return _oom_implied(layout, ooms)


def make_plan(
    base: List[str],
    cluster: Cluster,
    global_batch: int,
    *,
    efficiency: float = 0.5,
    headroom: float = 0.1,
    top: int = 5,
    max_measure: int = 200,
    time_budget: Optional[float] = None,
    opts: Optional[Options] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Plan:
    """Long because it is the search loop of the module docstring, one pass over the ordered candidates."""
    t0 = time.time()
    cfg = compose(base)
    valid, rejected = enumerate_layouts(cfg, cluster.world, cluster.gpus_per_node, global_batch, opts or Options())
    enumerated = len(valid) + len(rejected)
    flops = FlopCounter(cfg)
    n_params = sum(p.numel() for p in flops.net.parameters())
    cands = [Candidate(lay, lower_bound(cfg, flops, lay, cluster, efficiency)) for lay in valid]
    # Ties (layouts without a pipeline share one bound) go to the layout that splits activations over more
    # ranks (tp x cp x pp), then to the smaller state floor: the order only decides what is measured first.
    cands.sort(
        key=lambda c: (
            round(c.bound_s, 9),
            c.layout.in_backward,
            -c.layout.tp * c.layout.cp * c.layout.pp,
            state_floor(cfg, n_params, c.layout),
            c.layout.name(),
        )
    )
    budget = int(cluster.gpu_mem_gb * 1e9 * (1 - headroom))
    measurer = Measurer(cfg)
    feasible: List[Candidate] = []
    fits: set = set()
    ooms: Dict[Layout, int] = {}
    measured = 0
    for i, cand in enumerate(cands):
        lay = cand.layout
        best = sorted(c.cost.step_s for c in feasible)
        if len(best) >= top and cand.bound_s >= best[top - 1]:
            for c in cands[i:]:
                why = f"slower: even with free communication {c.bound_s:.4g} s >= the top {top}'s {best[top - 1]:.4g} s"
                rejected.append((c.layout, "slower (not measured)", why))
            break
        reason = memory_reason(lay, fits, ooms)
        floor = state_floor(cfg, n_params, lay)
        if reason is None and floor > budget:
            reason = (
                f"out of memory: weights and optimizer moments alone need {floor / 1e9:.1f} GB > {budget / 1e9:.1f} GB"
            )
        if reason is not None:
            rejected.append((lay, "memory (not measured)", reason))
            continue
        if measured >= max_measure:
            rejected.append((lay, "not measured", f"--max-measure {max_measure} reached"))
            continue
        if time_budget is not None and time.time() - t0 > time_budget:
            rejected.append((lay, "not measured", f"--time-budget {time_budget:g} s spent"))
            continue
        try:
            cand.ranks = measurer.rank_costs(lay)
        except ConfigError as exc:  # a check that runs only when the layout is built (e.g. COAT's groups vs tp)
            rejected.append((lay, "config refusal", str(exc)))
            continue
        measured += 1
        if log is not None:
            log(f"measured {measured}: {lay.name()} peak {cand.peak / 1e9:.2f} GB ({time.time() - t0:.0f} s)")
        if cand.peak > budget:
            over = (cand.peak - budget) / 1e9
            rejected.append(
                (lay, "out of memory", f"peak {cand.peak / 1e9:.2f} GB > budget {budget / 1e9:.2f} GB by {over:.2f} GB")
            )
            norm = replace(lay, micro_batch=1, grad_accum=1, in_backward=False)
            ooms[norm] = min(ooms.get(norm, lay.micro_batch), lay.micro_batch)
            continue
        fits.add(lay)
        cand.cost = step_cost(cfg, flops, lay, cluster, efficiency, cand.ranks)
        feasible.append(cand)
    feasible.sort(key=lambda c: c.cost.step_s)
    for cand in feasible[top:]:
        rejected.append((cand.layout, *_slower_reason(cand, feasible[0])))
    return Plan(
        base,
        cluster,
        global_batch,
        efficiency,
        budget,
        feasible[:top],
        feasible,
        rejected,
        enumerated,
        measured,
        measurer.steps_run,
        time.time() - t0,
    )


def _slower_reason(cand: Candidate, best: Candidate) -> Tuple[str, str]:
    c = cand.cost
    slower = f"{c.step_s:.4g} s vs {best.cost.step_s:.4g} s"
    if c.exposed_total >= max(c.bubble_s, 0.25 * c.compute_s):
        return (
            "communication bound",
            f"{slower}: exposed communication {c.exposed_total:.4g} s (compute {c.compute_s:.4g} s)",
        )
    if c.bubble_s >= 0.25 * c.compute_s:
        return "bubble", f"{slower}: pipeline bubble {c.bubble_s:.4g} s ({100 * c.bubble_fraction:.0f}% of compute)"
    return "slower", f"{slower} (compute {c.compute_s:.4g} s, recompute {c.recompute_s:.4g} s)"

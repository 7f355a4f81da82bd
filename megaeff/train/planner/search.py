"""The plan: enumerate, bound, measure best-first until the top N are known (branch and bound).

Before anything is measured, every valid layout gets two lower bounds (bounds.py): its memory floor (weights +
max(gradients, optimizer moments, the activations the schedule keeps in flight [+ gradients]) per rank) and its
step time (compute at the stated efficiency + pipeline bubble + the communication no overlap rule can hide). A
layout whose floor exceeds the budget is rejected unmeasured ("OOM by at least X"). The rest are measured in
increasing order of the step-time bound; once N fitting layouts are measured and the next bound is no better than
the N-th best step time, no unmeasured layout can enter the top N (its step is at least its bound, and every later
bound is larger), and the rest are rejected as "slower (bound, not measured)". The top N step times are therefore
those of the exhaustive search (`make_plan(exhaustive=True)`, which measures every layout:
tests/unit/test_planner.py compares them); where two layouts have the same step time, the one measured first is
shown.
Dominance rules that skip a measurement in both searches (each stated in the rejection):
- a layout with `optim.in_backward=true` is measured only when the same layout without it is out of memory
  (the switch only saves memory; the cost model's step time is the same);
- out of memory at micro-batch b implies out of memory at every larger micro-batch of the same layout, and
  with activation checkpointing on implies it with it off (both only add activations).
A measured layout whose peak is below its floor or whose step is below its bound is listed in `Plan.notes`
(an unsound bound; none is expected). The memory budget of a rank is the GPU's memory less `headroom` (held
back for what the tracker does not count: the CUDA context, NCCL's buffers, cuBLAS workspaces, the caching
allocator's fragmentation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megaeff.config.compose import compose
from megaeff.config.schema import Config
from megaeff.errors import ConfigError
from megaeff.train.planner.bounds import ParamCounts, floor_reason, state_floor, step_bound
from megaeff.train.planner.cluster import Cluster
from megaeff.train.planner.cost import Cost, FlopCounter, step_cost
from megaeff.train.planner.enumerate import Layout, Options, enumerate_layouts
from megaeff.train.planner.measure import Measurer, RankCost


@dataclass
class Candidate:
    layout: Layout
    bound_s: float  # bounds.step_bound
    floor: int = 0  # bounds.state_floor
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
    stats: Dict[str, int] = field(default_factory=dict)  # STAT_KEYS: how many layouts went which way
    notes: List[str] = field(default_factory=list)  # a measurement below its bound (must stay empty)


# enumerated = refused + floor + dominated + bound + capped + measured (+ build refusals, counted in refused);
# measured = oom + the fitting ones; exact_rows: the top rows whose step time no capped layout's bound is below
# (all of them when nothing was capped: the exhaustive search's rows).
STAT_KEYS = ("enumerated", "refused", "floor", "dominated", "measured", "oom", "bound", "capped")


def base_overrides(model: str, method: str, sets: Sequence[str], seq_len: int) -> List[str]:
    return [f"model={model}", f"method={method}", *sets, f"data.seq_len={seq_len}"]


def _oom_implied(layout: Layout, ooms: Dict[Layout, int]) -> Optional[str]:
    norm = replace(layout, micro_batch=1, grad_accum=1)  # in_backward kept: it saves memory
    for ac in (layout.activation_checkpointing, True):
        mb = ooms.get(replace(norm, activation_checkpointing=ac))
        if mb is not None and layout.micro_batch >= mb and (ac or not layout.activation_checkpointing):
            return (
                f"out of memory: the same layout at micro-batch {mb}" + (" with activation checkpointing" * ac) + " is"
            )
    return None


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
    exhaustive: bool = False,
    measurer: Optional[Measurer] = None,
) -> Plan:
    """The plan (module docstring). `exhaustive`: measure every candidate (no floor rejection, no stop on the
    bound; the dominance rules stay), the reference the tests compare the search with; `measurer`: reuse the
    fake steps of another plan of the same base config."""
    t0 = time.time()
    cfg = compose(base)
    valid, rejected = enumerate_layouts(cfg, cluster.world, cluster.gpus_per_node, global_batch, opts or Options())
    search = Search(cfg, cluster, efficiency, int(cluster.gpu_mem_gb * 1e9 * (1 - headroom)), top, measurer)
    search.stats["enumerated"] = len(valid) + len(rejected)
    search.stats["refused"] = len(rejected)
    search.rejected = rejected
    for cand in search.order(valid, prune_floor=not exhaustive):
        if search.cut(cand, by_bound=not exhaustive):
            continue
        if search.stats["measured"] >= max_measure:
            search.reject(cand, "not measured", f"--max-measure {max_measure} reached", "capped")
        elif time_budget is not None and time.time() - t0 > time_budget:
            search.reject(cand, "not measured", f"--time-budget {time_budget:g} s spent", "capped")
        else:
            search.visit(cand, log, t0)
    return search.plan(base, global_batch, time.time() - t0)


@dataclass
class Search:
    """The state of one search: candidates in bound order, what is measured, what is rejected and why."""

    cfg: Config
    cluster: Cluster
    efficiency: float
    budget: int
    top: int
    measurer: Optional[Measurer] = None
    feasible: List[Candidate] = field(default_factory=list)
    rejected: List[Tuple[Layout, str, str]] = field(default_factory=list)
    fits: set = field(default_factory=set)
    ooms: Dict[Layout, int] = field(default_factory=dict)
    stats: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0))
    notes: List[str] = field(default_factory=list)
    best: List[float] = field(default_factory=list)  # the top step times so far, ascending
    least_capped: float = float("inf")  # the smallest bound left unmeasured by --max-measure / --time-budget

    def __post_init__(self):
        self.flops = FlopCounter(self.cfg)
        self.counts = ParamCounts.of(self.flops)
        self.measurer = self.measurer or Measurer(self.cfg)

    def order(self, valid: List[Layout], prune_floor: bool) -> List[Candidate]:
        """Every valid layout with its bounds, those over the budget by their floor rejected (`prune_floor`), the
        rest in increasing step-time bound. Ties (equal bounds) go first to the smaller memory floor and
        micro-batch (likelier to fit; out of memory at a micro-batch implies it at larger ones), then to more
        ranks splitting the activations: the order decides what is measured first, not the result."""
        cands = []
        for lay in valid:
            floor = state_floor(self.cfg, self.counts, lay)
            if prune_floor and floor > self.budget:
                self.rejected.append(
                    (lay, "memory floor (not measured)", floor_reason(self.cfg, self.counts, lay, self.budget))
                )
                self.stats["floor"] += 1
                continue
            bound = step_bound(self.cfg, self.flops, self.counts, lay, self.cluster, self.efficiency)
            cands.append(Candidate(lay, bound, floor))
        split = lambda lay: lay.tp * lay.cp * lay.pp  # noqa: E731
        cands.sort(
            key=lambda c: (
                c.bound_s,
                c.layout.in_backward,
                c.floor,
                c.layout.micro_batch,
                -split(c.layout),
                c.layout.name(),
            )
        )
        return cands

    def cut(self, cand: Candidate, by_bound: bool = True) -> bool:
        """Branch and bound: once the top N are known, a candidate whose bound is no better than the N-th step
        time cannot enter them (nor can any later one: their bounds are larger)."""
        if by_bound and len(self.best) >= self.top and cand.bound_s >= self.best[self.top - 1]:
            why = (
                f"slower: its lower bound {cand.bound_s:.4g} s >= the top {self.top}'s {self.best[self.top - 1]:.4g} s"
            )
            self.reject(cand, "slower (bound, not measured)", why, "bound")
            return True
        reason = memory_reason(cand.layout, self.fits, self.ooms)
        if reason is not None:
            self.reject(cand, "memory (not measured)", reason, "dominated")
            return True
        return False

    def reject(self, cand: Candidate, group: str, why: str, stat: str) -> None:
        self.rejected.append((cand.layout, group, why))
        self.stats[stat] += 1
        if stat == "capped":
            self.least_capped = min(self.least_capped, cand.bound_s)

    def visit(self, cand: Candidate, log: Optional[Callable[[str], None]], t0: float) -> None:
        """Measure one candidate, then file it as fitting (with its cost) or out of memory."""
        lay = cand.layout
        try:
            cand.ranks = self.measurer.rank_costs(lay)
        except ConfigError as exc:  # a check that runs only when the layout is built (e.g. COAT's groups vs tp)
            self.reject(cand, "config refusal", str(exc), "refused")
            return
        self.stats["measured"] += 1
        if cand.peak < cand.floor:
            self.notes.append(f"unsound memory floor: {lay.name()} floor {cand.floor} > measured peak {cand.peak}")
        if log is not None:
            n, gb = self.stats["measured"], cand.peak / 1e9
            log(f"measured {n}: {lay.name()} peak {gb:.2f} GB, bound {cand.bound_s:.4g} s ({time.time() - t0:.0f} s)")
        if cand.peak > self.budget:
            over = (cand.peak - self.budget) / 1e9
            why = f"peak {cand.peak / 1e9:.2f} GB > budget {self.budget / 1e9:.2f} GB by {over:.2f} GB"
            self.reject(cand, "out of memory", why, "oom")
            norm = replace(lay, micro_batch=1, grad_accum=1)
            self.ooms[norm] = min(self.ooms.get(norm, lay.micro_batch), lay.micro_batch)
            return
        self.fits.add(lay)
        cand.cost = step_cost(self.cfg, self.flops, lay, self.cluster, self.efficiency, cand.ranks)
        if cand.cost.step_s < cand.bound_s * (1 - 1e-9):
            self.notes.append(
                f"unsound step bound: {lay.name()} bound {cand.bound_s:.6g} s > step {cand.cost.step_s:.6g} s"
            )
        self.feasible.append(cand)
        self.best = sorted(self.best + [cand.cost.step_s])[: self.top]

    def plan(self, base: List[str], global_batch: int, seconds: float) -> Plan:
        feasible = sorted(self.feasible, key=lambda c: c.cost.step_s)  # stable: ties keep the measuring order
        for cand in feasible[self.top :]:
            self.rejected.append((cand.layout, *_slower_reason(cand, feasible[0])))
        # Rows no unmeasured layout can beat: all of them unless a cap left a bound below a row's step time.
        self.stats["exact_rows"] = sum(c.cost.step_s <= self.least_capped for c in feasible[: self.top])
        return Plan(
            base,
            self.cluster,
            global_batch,
            self.efficiency,
            self.budget,
            feasible[: self.top],
            feasible,
            self.rejected,
            self.stats["enumerated"],
            self.stats["measured"],
            self.measurer.steps_run,
            seconds,
            dict(self.stats),
            list(self.notes),
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

"""Per-rank peak memory and comm bytes of a layout, from the fake-tensor step at reduced depth, extrapolated.

A whole 7B or 70B step per candidate is too slow to enumerate, so each rank is measured with
`measure_step` (megaeff/train/memory/fake_step.py) at k = 1 and 2 layers per virtual pipeline stage (the real
micro-batch and sequence shapes), and, when the step has more micro-batches than `m_b` below, at two
micro-batch counts m_a < m_b, and every quantity is extrapolated to the real (layers per stage K, micro-batches M)
by the bilinear form f(k, m) = a + b k + c m + d k m through the 4 points (k = 2 and 3 under FSSDP: `depth_points`;
a real depth or micro-batch count no larger than the measured ones is measured directly).

Why bilinear is exact (tests/unit/test_planner.py checks it against a direct `measure_step`):
- comm bytes: every collective belongs to a layer (tp's per micro-batch and layer: the k m term), to the step
  (dp's gradient reduction, k), to a micro-batch (pipeline p2p, cp's ring of each layer: m and k m) or to
  nothing (scalars: a). FSSDP's sparse embedding exchange depends on the token ids, which make_batches draws
  in order, so its m-slope is the last measured micro-batch's bytes: exact for the depth, data-dependent in m.
- memory: the tracker's peak of each phase (forward, backward, clipping, optimizer, ...) is taken separately
  (`PhasePeakTracker`) and extrapolated separately, the peak is the largest: a phase's peak is state (a + b k)
  plus what the schedule keeps in flight, which is constant in m once the schedule is in its steady state
  (m_a below) and proportional to k (or k m for GPipe). Taking the peak per phase keeps a peak that moves from
  one phase to another with depth exact; within one phase the peak must stay at the same point of the layer
  sequence (true for the layouts the tests check; stated as a limit in docs/planner.md).
The steady state (found by measurement on tiny shapes, checked by the tests): the peak phase of a step must have
a micro-batch that is neither the first nor the last and, with a pipeline, a full warm-up before it. No pipeline
or 1F1B: m_a = pp + 2 (1F1B's rank 0 holds min(pp, m) micro-batches; an FSSDP or 1F1B step of m = pp + 1
still peaks in its last backward, which differs from the middle ones); interleaved: m_a = 2 pp (the warm-up
forwards min(2(pp-1) + (v-1) pp, v m) stop being capped by v m). m_b = m_a + 1, or m_a + pp for interleaved
(m divisible by pp).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, List, Tuple

from megaeff.config.schema import Config
from megaeff.train.memory.fake_step import measure_step
from megaeff.train.memory.tracker import StepMemoryTracker
from megaeff.train.planner.enumerate import Layout, apply, measured_ranks


class PhasePeakTracker(StepMemoryTracker):
    """StepMemoryTracker that also keeps the peak of each phase in `sink` (phase -> bytes)."""

    def __init__(self, model, optimizer=None, fake_reads=False, *, sink: Dict[str, int]):
        super().__init__(model, optimizer, fake_reads=fake_reads)
        self.sink = sink

    def _tick(self) -> None:
        if self.live_bytes > self.sink.get(self.phase, -1):
            self.sink[self.phase] = self.live_bytes
        super()._tick()


@dataclass
class Point:
    """One fake-tensor step of one rank."""

    peak: int
    phase_peaks: Dict[str, int]
    comm: Dict[str, int]
    state: Dict[str, int]  # param / grad / optimizer-state bytes


@dataclass
class RankCost:
    rank: int
    peak: int
    comm: Dict[str, int]
    state: Dict[str, int]
    phase: str  # the phase that holds the extrapolated peak


@dataclass
class Measurer:
    """Runs and caches the reduced fake steps (one cache per plan: nothing global)."""

    cfg: Config
    cache: Dict[Tuple, Point] = field(default_factory=dict)
    steps_run: int = 0

    def point(self, layout: Layout, depth: int, micro: int, rank: int) -> Point:
        key = (layout.__class__(**{**layout.__dict__, "grad_accum": micro}), depth, rank)
        if key not in self.cache:
            self.cache[key] = self._run(layout, depth, micro, rank)
        return self.cache[key]

    def _run(self, layout: Layout, depth: int, micro: int, rank: int) -> Point:
        cfg = apply(self.cfg, layout)
        cfg.model.n_layers = depth * layout.pp * layout.pp_virtual
        cfg.train.grad_accum = micro
        cfg.parallel.pp_boundaries = []
        sink: Dict[str, int] = {}
        report = measure_step(cfg, rank, tracker_cls=functools.partial(PhasePeakTracker, sink=sink))
        self.steps_run += 1
        keys = ("param_bytes", "grad_bytes", "optimizer_state_bytes")
        phases = steady_phase_peaks(sink, report.extra["optimizer_state_bytes"])
        return Point(max(phases.values()), phases, dict(report.extra["comm_bytes"]), {k: report.extra[k] for k in keys})

    def rank_costs(self, layout: Layout) -> List[RankCost]:
        """Extrapolated cost of each rank whose cost differs (`measured_ranks`)."""
        depth = self.cfg.model.n_layers // (layout.pp * layout.pp_virtual)
        ks, ms = depth_points(layout, depth), micro_points(layout)
        out = []
        for rank in measured_ranks(layout):
            pts = {(k, m): self.point(layout, k, m, rank) for k in ks for m in ms}
            out.append(extrapolate(pts, depth, layout.grad_accum, rank))
        return out


# Phases of a step that run before its optimizer step: a first step's optimizer state does not exist yet there.
BEFORE_OPTIMIZER = ("setup", "forward", "backward", "after_backward")


def steady_phase_peaks(first_step: Dict[str, int], optimizer_state_bytes: int) -> Dict[str, int]:
    """The phase peaks of a later training step from those of a first one: the optimizer state (created by the
    first step's optimizer, or its backward under optim.in_backward) is held through every phase of the later
    steps, the rest of each phase is the same. Equal to the byte to a measured second step (`measure_step(...,
    warm_steps=1)`) in tests/unit/test_planner.py."""
    return {ph: v + (optimizer_state_bytes if ph in BEFORE_OPTIMIZER else 0) for ph, v in first_step.items()}


def steady_micro(layout: Layout) -> Tuple[int, int]:
    """(m_a, m_b): two micro-batch counts in the schedule's steady state (module docstring)."""
    if layout.pp_schedule == "interleaved" and layout.pp > 1:
        return 2 * layout.pp, 3 * layout.pp
    return layout.pp + 2, layout.pp + 3


def depth_points(layout: Layout, depth: int) -> Tuple[int, ...]:
    """Layers per virtual stage to measure: (1, 2), or (2, 3) under FSSDP (with one layer nothing is prefetched
    during the forward, so its forward peak is not on the line through deeper ones); the real depth itself when
    it is no deeper."""
    ks = (2, 3) if layout.dp_impl == "fssdp" else (1, 2)
    return (depth,) if depth <= ks[1] else ks


def micro_points(layout: Layout) -> Tuple[int, ...]:
    """The micro-batch counts to measure: the real one when it is at most m_b, else (m_a, m_b)."""
    m_a, m_b = steady_micro(layout)
    return (layout.grad_accum,) if layout.grad_accum <= m_b else (m_a, m_b)


def bilinear(values: Dict[Tuple[int, int], int], k: int, m: int) -> int:
    """f(k, m) = a + b k + c m + d k m through the points {(k_i, m_j)} (one m when only one was measured)."""
    ks = sorted({p[0] for p in values})
    ms = sorted({p[1] for p in values})
    k1, k2, m1 = ks[0], ks[-1], ms[0]
    tk = Fraction(k - k1, k2 - k1) if len(ks) > 1 else Fraction(0)
    f11, f21 = values[(k1, m1)], values[(k2, m1)]
    if len(ms) == 1:
        return _exact(f11 + tk * (f21 - f11))
    m2 = ms[1]
    tm = Fraction(m - m1, m2 - m1)
    f12, f22 = values[(k1, m2)], values[(k2, m2)]
    return _exact(f11 + tk * (f21 - f11) + tm * (f12 - f11) + tk * tm * (f22 - f21 - f12 + f11))


def _exact(x: Fraction) -> int:
    # Byte counts: a non-integer result means the points are not bilinear (rounded; tests compare exactly).
    return int(round(x))


def extrapolate(points: Dict[Tuple[int, int], Point], depth: int, micro: int, rank: int) -> RankCost:
    """The rank's cost at `depth` layers per virtual stage and `micro` micro-batches (module docstring)."""
    phases = set.intersection(*(set(p.phase_peaks) for p in points.values()))
    per_phase = {ph: bilinear({k: p.phase_peaks[ph] for k, p in points.items()}, depth, micro) for ph in phases}
    phase = max(per_phase, key=per_phase.get)
    keys = set().union(*(p.comm for p in points.values()))
    comm = {key: bilinear({k: p.comm.get(key, 0) for k, p in points.items()}, depth, micro) for key in sorted(keys)}
    state_keys = next(iter(points.values())).state
    state = {s: bilinear({k: p.state[s] for k, p in points.items()}, depth, micro) for s in state_keys}
    return RankCost(rank, per_phase[phase], {k: v for k, v in comm.items() if v}, state, phase)

"""Pipeline-parallel schedules as plain data, plus an event simulator to check and measure them.

A schedule is, per pipeline rank, the ordered list of `Action`s that rank runs in one optimizer step. The executor
walks that list and does the p2p sends/recvs each action implies; everything here is pure Python so the orders can
be tested, drawn (tools/pipeline_schedule.py) and measured without processes.

Stages: the model's layers are split into `pp * virtual` virtual stages; chunk `c` on rank `r` is virtual stage
`c * pp + r` (Megatron's looped placement). With `virtual == 1` the chunk is always 0 and the stage is the rank.

Dependencies (what the executor's p2p implies, and what `simulate` enforces):
  F(mb, s) needs F(mb, s-1)                (s > 0; for interleaved the producer may be rank pp-1, chunk c-1)
  B(mb, s) needs F(mb, s) and B(mb, s+1)   (the last stage's backward starts from its own loss)

Bubble fraction (`bubble_fraction`): every rank is charged from time 0 to the makespan, because a flush schedule's
optimizer step waits for the slowest rank. With `busy_r` the compute time of rank r,
  bubble = sum_r (makespan - busy_r) / sum_r busy_r
i.e. idle / ideal compute. `t_f`/`t_b` are the forward/backward times of one rank's whole share of layers, so each
interleaved chunk action takes `t_f / virtual`; under that model the simulation reproduces the closed forms exactly:
(pp-1)/m for GPipe and 1F1B, (pp-1)/(virtual*m) for interleaved (see `closed_form_bubble`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Sequence, Tuple

PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass(frozen=True)
class Action:
    kind: str  # "F" (forward) or "B" (backward)
    microbatch: int  # 0..m-1
    chunk: int  # model chunk (virtual stage) index on this rank, 0..v-1; always 0 unless interleaved

    def label(self, virtual: int = 1) -> str:
        return f"{self.kind}{self.microbatch}" + (f"c{self.chunk}" if virtual > 1 else "")


class PipelineDeadlockError(RuntimeError):
    """The per-rank orders leave some action waiting forever on a dependency."""


def virtual_stage(rank: int, chunk: int, pp: int) -> int:
    return chunk * pp + rank


def _check_count(arg: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")


def _validate_args(name: str, pp: int, microbatches: int, virtual: int) -> None:
    if name not in PIPELINE_SCHEDULES:
        raise ValueError(f"unknown schedule name {name!r}; available: {', '.join(PIPELINE_SCHEDULES)}")
    _check_count("pp", pp)
    _check_count("microbatches", microbatches)
    _check_count("virtual", virtual)
    if virtual > 1 and name != "interleaved":
        raise ValueError(f"virtual={virtual} needs the 'interleaved' schedule; {name!r} runs one chunk per rank")
    if name == "interleaved" and microbatches % pp != 0:
        raise ValueError(
            f"interleaved schedule needs microbatches divisible by pp, got microbatches={microbatches}, pp={pp}"
        )


def _warmup_steady_cooldown(fwd: List[Action], bwd: List[Action], warmup: int) -> List[Action]:
    # Megatron's loop shape: `warmup` forwards, then each steady iteration runs the next forward before the oldest
    # outstanding backward, then the remaining backwards drain the pipeline.
    steady = len(fwd) - warmup
    order = fwd[:warmup]
    for k in range(steady):
        order += [fwd[warmup + k], bwd[k]]
    return order + bwd[steady:]


def _interleaved_table(pp: int, microbatches: int, virtual: int) -> List[Tuple[int, int]]:
    # Megatron's get_schedule_table with microbatch_group_size_per_vp_stage = pp (its default): each group of pp
    # microbatches visits every chunk in turn before the next group starts.
    return [(mb, c) for g in range(0, microbatches, pp) for c in range(virtual) for mb in range(g, g + pp)]


def warmup_forwards(name: str, pp: int, microbatches: int, rank: int, virtual: int = 1) -> int:
    """Forwards rank `rank` runs before its first backward is scheduled (Megatron's get_pp_rank_microbatches).

    gpipe: all m. 1f1b: min(pp - rank - 1, m). interleaved (v > 1): min(2*(pp - rank - 1) + (v - 1)*pp, v*m);
    the extra pp - rank - 1 lets the first backward of the last chunk arrive without stalling the earlier chunks.
    Megatron only runs its interleaved loop with v > 1, so v == 1 uses the 1f1b count and the two orders coincide.
    """
    _validate_args(name, pp, microbatches, virtual)
    if name == "gpipe":
        return microbatches
    if name == "1f1b" or virtual == 1:
        return min(pp - rank - 1, microbatches)
    return min(2 * (pp - rank - 1) + (virtual - 1) * pp, virtual * microbatches)


def build_schedule(name: str, pp: int, microbatches: int, virtual: int = 1) -> List[List[Action]]:
    """Per pipeline rank (0..pp-1), the ordered list of actions it executes in one optimizer step."""
    _validate_args(name, pp, microbatches, virtual)
    if name == "interleaved":
        table = _interleaved_table(pp, microbatches, virtual)
        fwd = [Action("F", mb, c) for mb, c in table]
        # Backward walks the same table with the chunk order mirrored: the last chunk holds the loss.
        bwd = [Action("B", mb, virtual - 1 - c) for mb, c in table]
    else:
        fwd = [Action("F", mb, 0) for mb in range(microbatches)]
        bwd = [Action("B", mb, 0) for mb in range(microbatches)]
    return [_warmup_steady_cooldown(fwd, bwd, warmup_forwards(name, pp, microbatches, r, virtual)) for r in range(pp)]


def closed_form_bubble(name: str, pp: int, microbatches: int, virtual: int = 1) -> float:
    """Narayanan et al. (SC'21): (pp-1)/m for GPipe and 1F1B, (pp-1)/(v*m) for interleaved."""
    _validate_args(name, pp, microbatches, virtual)
    return (pp - 1) / (virtual * microbatches)


@dataclass
class SimResult:
    starts: List[List[float]]  # starts[r][i]: start time of schedule[r][i]
    ends: List[List[float]]
    makespan: float
    busy: List[float]  # per-rank compute time
    idle: List[float]  # per-rank makespan - busy (includes waiting at the start and the tail)


def validate_schedule(schedule: Sequence[Sequence[Action]], pp: int, virtual: int = 1) -> int:
    """Check every rank runs F and B of every (microbatch, chunk) exactly once; return the microbatch count."""
    _check_count("pp", pp)
    _check_count("virtual", virtual)
    if len(schedule) != pp:
        raise ValueError(f"schedule has {len(schedule)} ranks, expected pp={pp}")
    mbs = {a.microbatch for rank in schedule for a in rank}
    microbatches = max(mbs) + 1 if mbs else 0
    expected = {(k, mb, c) for k in "FB" for mb in range(microbatches) for c in range(virtual)}
    for r, rank in enumerate(schedule):
        seen = [(a.kind, a.microbatch, a.chunk) for a in rank]
        if len(seen) != len(set(seen)) or set(seen) != expected:
            raise ValueError(
                f"rank {r} must run F and B of each of {microbatches} microbatches x {virtual} chunks exactly once"
            )
    return microbatches


def simulate(
    schedule: Sequence[Sequence[Action]], pp: int, virtual: int = 1, t_f: float = 1.0, t_b: float = 2.0
) -> SimResult:
    """Event-simulate `schedule`: each rank runs its list strictly in order; an action starts once its rank is free
    and its dependencies have ended (communication is free). Raises PipelineDeadlockError if some action can never
    start. `t_f`/`t_b` are per rank-share of layers; a chunk action takes 1/virtual of it."""
    validate_schedule(schedule, pp, virtual)
    duration = {"F": t_f / virtual, "B": t_b / virtual}
    last_stage = pp * virtual - 1
    done: Dict[Tuple[str, int, int], float] = {}
    starts: List[List[float]] = [[] for _ in range(pp)]
    ends: List[List[float]] = [[] for _ in range(pp)]
    free = [0.0] * pp
    # Start times are a fixed point of max(rank free, dependency ends), so rank visiting order is irrelevant:
    # sweep all ranks until none can advance.
    progressed = True
    while progressed:
        progressed = False
        for r in range(pp):
            while len(starts[r]) < len(schedule[r]):
                a = schedule[r][len(starts[r])]
                s = virtual_stage(r, a.chunk, pp)
                if a.kind == "F":
                    deps = [("F", a.microbatch, s - 1)] if s > 0 else []
                else:
                    deps = [("F", a.microbatch, s)] + ([("B", a.microbatch, s + 1)] if s < last_stage else [])
                if any(d not in done for d in deps):
                    break
                start = max([free[r]] + [done[d] for d in deps])
                free[r] = start + duration[a.kind]
                done[(a.kind, a.microbatch, s)] = free[r]
                starts[r].append(start)
                ends[r].append(free[r])
                progressed = True
    stuck = [
        f"rank {r}: {schedule[r][len(starts[r])].label(virtual)}"
        for r in range(pp)
        if len(starts[r]) < len(schedule[r])
    ]
    if stuck:
        raise PipelineDeadlockError("schedule deadlocks; blocked at " + ", ".join(stuck))
    makespan = max(free)
    busy = [sum(duration[a.kind] for a in rank) for rank in schedule]
    return SimResult(starts, ends, makespan, busy, [makespan - b for b in busy])


def bubble_fraction(
    schedule: Sequence[Sequence[Action]], pp: int, virtual: int = 1, t_f: float = 1.0, t_b: float = 2.0
) -> float:
    """Idle / ideal compute from the simulated schedule: sum_r (makespan - busy_r) / sum_r busy_r."""
    sim = simulate(schedule, pp, virtual, t_f, t_b)
    return sum(sim.idle) / sum(sim.busy)


def peak_in_flight(schedule_for_rank: Sequence[Action]) -> int:
    """Max number of (microbatch, chunk) pairs whose forward has run and backward has not, on one rank.

    Counting per chunk matches Megatron's interleaved bookkeeping (the sum of len(input_tensors[chunk])): each pair
    holds one chunk's activations, i.e. 1/v of a non-interleaved microbatch's. 1F1B on rank r peaks at
    min(pp - r, m); GPipe at m.
    """
    live, peak = set(), 0
    for a in schedule_for_rank:
        if a.kind == "F":
            live.add((a.microbatch, a.chunk))
            peak = max(peak, len(live))
        else:
            live.discard((a.microbatch, a.chunk))
    return peak


def _grid_unit(values: Sequence[float]) -> Fraction:
    fracs = [Fraction(v).limit_denominator(1000) for v in values if v > 0]
    den = math.lcm(*(f.denominator for f in fracs))
    return Fraction(math.gcd(*(int(f * den) for f in fracs)), den)


def format_timeline(
    schedule: Sequence[Sequence[Action]],
    pp: int,
    virtual: int = 1,
    t_f: float = 1.0,
    t_b: float = 2.0,
    max_cells: int = 400,
) -> str:
    """Rows per rank with each action's label placed at its simulated start; '.' marks idle time slots.

    The slot is the largest time step dividing both action durations, so a backward of twice the forward's cost
    spans two slots. Above `max_cells` slots the timing is dropped and only the per-rank order is printed.
    """
    sim = simulate(schedule, pp, virtual, t_f, t_b)
    unit = _grid_unit([t_f / virtual, t_b / virtual])
    cells = round(Fraction(sim.makespan).limit_denominator(1000) / unit)
    width = max(len(a.label(virtual)) for rank in schedule for a in rank) + 1
    head = [f"rank {r:<{len(str(pp - 1))}} |" for r in range(pp)]
    if cells > max_cells:
        rows = [h + " ".join(a.label(virtual) for a in rank) for h, rank in zip(head, schedule)]
        return "\n".join([f"(order only: {cells} time slots exceed max_cells={max_cells})"] + rows)
    lines = []
    axis = [" "] * ((cells + 1) * width)
    step = max(1, math.ceil((len(f"{float(cells * unit):g}") + 1) / width))
    for c in range(0, cells + 1, step):
        tick = f"{float(c * unit):g}"
        axis[c * width : c * width + len(tick)] = tick
    lines.append(" " * len(head[0]) + "".join(axis).rstrip())
    for r, rank in enumerate(schedule):
        row = (["."] + [" "] * (width - 1)) * cells
        for a, start, end in zip(rank, sim.starts[r], sim.ends[r]):
            c0 = round(Fraction(start).limit_denominator(1000) / unit)
            span = round(Fraction(end).limit_denominator(1000) / unit) - c0
            text = a.label(virtual).ljust(span * width)
            row[c0 * width : (c0 + span) * width] = text
        lines.append(head[r] + "".join(row).rstrip())
    return "\n".join(lines)


def schedule_report(
    name: str, pp: int, microbatches: int, virtual: int = 1, t_f: float = 1.0, t_b: float = 2.0
) -> dict:
    """Everything the CLI prints or dumps as JSON: orders with simulated times, bubble and peak in-flight per rank."""
    schedule = build_schedule(name, pp, microbatches, virtual)
    sim = simulate(schedule, pp, virtual, t_f, t_b)
    return {
        "schedule": name,
        "pp": pp,
        "microbatches": microbatches,
        "virtual": virtual,
        "t_f": t_f,
        "t_b": t_b,
        "makespan": sim.makespan,
        "bubble_fraction": sum(sim.idle) / sum(sim.busy),
        "bubble_closed_form": closed_form_bubble(name, pp, microbatches, virtual),
        "ranks": [
            {
                "rank": r,
                "warmup_forwards": warmup_forwards(name, pp, microbatches, r, virtual),
                "peak_in_flight": peak_in_flight(schedule[r]),
                "busy": sim.busy[r],
                "idle": sim.idle[r],
                "actions": [
                    {"kind": a.kind, "microbatch": a.microbatch, "chunk": a.chunk, "start": s, "end": e}
                    for a, s, e in zip(schedule[r], sim.starts[r], sim.ends[r])
                ],
            }
            for r in range(pp)
        ],
    }


def format_report(name: str, pp: int, microbatches: int, virtual: int = 1, t_f: float = 1.0, t_b: float = 2.0) -> str:
    """Timeline plus the simulated bubble next to its closed form and peak in-flight per rank."""
    report = schedule_report(name, pp, microbatches, virtual, t_f, t_b)
    schedule = build_schedule(name, pp, microbatches, virtual)
    lines = [
        f"schedule={name} pp={pp} microbatches={microbatches} virtual={virtual} t_f={t_f:g} t_b={t_b:g}",
        format_timeline(schedule, pp, virtual, t_f, t_b),
        f"makespan {report['makespan']:g}; bubble (idle / compute) simulated {report['bubble_fraction']:.6f}, "
        f"closed form {report['bubble_closed_form']:.6f}",
    ]
    for rank in report["ranks"]:
        lines.append(
            f"rank {rank['rank']}: warm-up forwards {rank['warmup_forwards']}, "
            f"peak in-flight {rank['peak_in_flight']}, idle {rank['idle']:g}"
        )
    return "\n".join(lines)

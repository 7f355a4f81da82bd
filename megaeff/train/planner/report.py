"""What a plan prints and writes: the table of the top layouts, the rejected ones by reason, the best layout as
one line of Hydra overrides and as a `parallel` group file (`<out-dir>/parallel/<name>.yaml`, with
`overrides.txt` and `plan.json` beside it)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from megaeff.train.planner.search import Candidate, Plan


def _axis_exposed(cand: Candidate) -> str:
    by_axis: Dict[str, float] = defaultdict(float)
    for key, t in cand.cost.exposed_s.items():
        by_axis[key.split("/")[0]] += t
    parts = [f"{a} {t:.3g}" for a, t in sorted(by_axis.items(), key=lambda kv: -kv[1]) if t > 0]
    return ", ".join(parts[:3]) or "-"


def format_table(plan: Plan) -> str:
    head = (
        "#",
        "layout",
        "peak/budget GB",
        "compute s",
        "recompute s",
        "exposed comm s (by group)",
        "bubble s",
        "step s",
    )
    head += ("MFU", "tokens/s")
    rows = []
    for i, c in enumerate(plan.top, 1):
        k = c.cost
        rows.append(
            (
                str(i),
                c.layout.name(),
                f"{c.peak / 1e9:.2f}/{plan.budget_bytes / 1e9:.1f}",
                f"{k.compute_s:.3g}",
                f"{k.recompute_s:.3g}",
                _axis_exposed(c),
                f"{k.bubble_s:.3g}",
                f"{k.step_s:.3g}",
                f"{100 * k.mfu:.1f}%",
                f"{k.tokens_per_s:,.0f}",
            )
        )
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def overrides(plan: Plan) -> List[str]:
    """The best layout as Hydra overrides on top of the plan's base."""
    return plan.base + plan.top[0].layout.overrides() if plan.top else []


def format_rejected(plan: Plan, per_group: int = 3) -> str:
    groups: Dict[str, List] = defaultdict(list)
    for layout, group, reason in plan.rejected:
        groups[group].append((layout, reason))
    lines = []
    for group, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"{group}: {len(items)}")
        for layout, reason in items[:per_group]:
            lines.append(f"  {layout.name()}: {reason}")
        if len(items) > per_group:
            lines.append(f"  ... {len(items) - per_group} more")
    return "\n".join(lines)


def format_search(plan: Plan) -> str:
    """The footer: where every enumerated layout went (search.STAT_KEYS), and any unsound bound."""
    s = plan.stats
    if not s:
        return ""
    fitting = s["measured"] - s["oom"]
    lines = [
        f"search: {s['enumerated']} layouts; {s['refused']} refused by megaeff's checks or pruned by rule, "
        f"{s['floor']} over the budget by their memory floor, {s['dominated']} skipped by a memory dominance rule, "
        f"{s['measured']} measured ({fitting} fit, {s['oom']} out of memory; {plan.fake_steps} fake steps), "
        f"{s['bound']} pruned by the step-time bound, {s['capped']} not measured (--max-measure / --time-budget)",
        f"exact rows: {s.get('exact_rows', 0)} of {len(plan.top)} (rows no unmeasured layout's bound is below: the "
        "exhaustive search's)",
    ]
    lines += [f"WARNING: {note}" for note in plan.notes]
    return "\n".join(lines)


def format_plan(plan: Plan) -> str:
    c = plan.cluster
    head = (
        f"megaeff-plan: {' '.join(plan.base)}, global batch {plan.global_batch} sequences, "
        f"{c.name} {c.nodes} x {c.gpus_per_node} GPUs ({c.gpu_mem_gb:g} GB, {c.peak_tflops:g} TFLOP/s, "
        f"efficiency {plan.efficiency:g}); {plan.enumerated} layouts, {plan.measured} measured "
        f"({plan.fake_steps} fake steps), {plan.seconds:.0f} s"
    )
    if not plan.top:
        return "\n".join([head, "no layout fits; rejected:", format_rejected(plan), "", format_search(plan)])
    return "\n".join(
        [
            head,
            format_table(plan),
            "",
            "best layout as overrides:",
            "  " + " ".join(overrides(plan)),
            "",
            "rejected:",
            format_rejected(plan),
            "",
            format_search(plan),
        ]
    )


def parallel_yaml(plan: Plan) -> str:
    best = plan.top[0].layout
    lines = [
        f"# megaeff-plan's best layout for {' '.join(plan.base)} on {plan.cluster.nodes} x "
        f"{plan.cluster.gpus_per_node} {plan.cluster.name}, global batch {plan.global_batch}.",
        f"# Use with: {' '.join(o for o in best.overrides() if not o.startswith('parallel.'))}",
    ]
    for key, value in best.parallel_fields().items():
        lines.append(f"{key}: {str(value).lower() if isinstance(value, bool) else value}")
    return "\n".join(lines) + "\n"


def to_json(plan: Plan) -> Dict:
    def cand(c: Candidate) -> Dict:
        return {
            "layout": c.layout.name(),
            "fields": c.layout.__dict__,
            "overrides": c.layout.overrides(),
            "peak_bytes": c.peak,
            "ranks": [r.__dict__ for r in c.ranks],
            "bound_s": c.bound_s,
            "floor_bytes": c.floor,
            "cost": {**c.cost.__dict__, "exposed_total": c.cost.exposed_total},
        }

    return {
        "base": plan.base,
        "cluster": plan.cluster.as_dict(),
        "global_batch": plan.global_batch,
        "efficiency": plan.efficiency,
        "budget_bytes": plan.budget_bytes,
        "top": [cand(c) for c in plan.top],
        "best_overrides": overrides(plan),
        "rejected": [{"layout": lay.name(), "group": g, "reason": r} for lay, g, r in plan.rejected],
        "enumerated": plan.enumerated,
        "measured": plan.measured,
        "fake_steps": plan.fake_steps,
        "seconds": plan.seconds,
        "search": plan.stats,
        "notes": plan.notes,
    }


def write_outputs(plan: Plan, out_dir: str) -> Path:
    """`<out_dir>/parallel/<name>.yaml`, `overrides.txt`, `plan.json`; returns the yaml's path."""
    out = Path(out_dir)
    (out / "parallel").mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(to_json(plan), indent=2) + "\n")
    if not plan.top:
        return out / "plan.json"
    path = out / "parallel" / f"{plan.top[0].layout.name()}.yaml"
    path.write_text(parallel_yaml(plan))
    (out / "overrides.txt").write_text(" ".join(overrides(plan)) + "\n")
    return path

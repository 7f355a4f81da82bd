#!/usr/bin/env python
"""Print, plot or dump a pipeline schedule as simulated per rank:
`python tools/pipeline_schedule.py --schedule 1f1b --pp 4 --microbatches 8 [--virtual 2] [--png out.png]
[--json out.json]`."""

import argparse
import json
import sys
from typing import Optional, Sequence

from megaeff.distributed.pipeline.schedule import (
    PIPELINE_SCHEDULES,
    Action,
    build_schedule,
    format_report,
    schedule_report,
    simulate,
)


def plot_gantt(
    schedule: Sequence[Sequence[Action]],
    pp: int,
    path: str,
    virtual: int = 1,
    t_f: float = 1.0,
    t_b: float = 2.0,
    title: Optional[str] = None,
) -> None:
    """Gantt chart of the simulated schedule written to `path` (forwards blue, backwards orange, darker per chunk)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the trainer's dry-run and CI have no display
    import matplotlib.pyplot as plt

    sim = simulate(schedule, pp, virtual, t_f, t_b)
    shades = [0.45 + 0.5 * c / max(1, virtual - 1) for c in range(virtual)] if virtual > 1 else [0.7]
    cmaps = {"F": plt.get_cmap("Blues"), "B": plt.get_cmap("Oranges")}
    # About 0.4 inch per forward slot so labels fit, clamped to stay a sane image size.
    width = min(40.0, max(6.0, 0.4 * sim.makespan / (t_f / virtual)))
    fig, ax = plt.subplots(figsize=(width, 0.6 * pp + 1.2))
    for r, rank in enumerate(schedule):
        for a, start, end in zip(rank, sim.starts[r], sim.ends[r]):
            ax.broken_barh(
                [(start, end - start)],
                (r - 0.4, 0.8),
                facecolors=cmaps[a.kind](shades[a.chunk]),
                edgecolor="black",
                linewidth=0.5,
            )
            ax.text(
                (start + end) / 2,
                r,
                a.label(virtual),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if shades[a.chunk] > 0.8 else "black",
            )
    ax.set_yticks(range(pp), [f"rank {r}" for r in range(pp)])
    ax.invert_yaxis()  # rank 0 on top, as pipeline diagrams are drawn
    ax.set_xlim(0, sim.makespan)
    ax.set_xlabel("time")
    ax.set_title(title or f"bubble {sum(sim.idle) / sum(sim.busy):.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", choices=PIPELINE_SCHEDULES, default="1f1b")
    parser.add_argument("--pp", type=int, required=True, help="pipeline stages (ranks)")
    parser.add_argument("--microbatches", type=int, required=True)
    parser.add_argument("--virtual", type=int, default=1, help="model chunks per rank (interleaved only)")
    parser.add_argument("--t-f", type=float, default=1.0, help="forward time of one rank's layers")
    parser.add_argument("--t-b", type=float, default=2.0, help="backward time of one rank's layers")
    parser.add_argument("--png", help="write a Gantt chart here")
    parser.add_argument("--json", help="write per-rank orders, simulated times, bubble and peak in-flight here")
    args = parser.parse_args(argv)
    try:
        print(format_report(args.schedule, args.pp, args.microbatches, args.virtual, args.t_f, args.t_b))
    except ValueError as exc:
        parser.error(str(exc))
    if args.png:
        schedule = build_schedule(args.schedule, args.pp, args.microbatches, args.virtual)
        plot_gantt(
            schedule,
            args.pp,
            args.png,
            args.virtual,
            args.t_f,
            args.t_b,
            title=f"{args.schedule} pp={args.pp} m={args.microbatches} v={args.virtual}",
        )
    if args.json:
        report = schedule_report(args.schedule, args.pp, args.microbatches, args.virtual, args.t_f, args.t_b)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

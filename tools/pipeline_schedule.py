#!/usr/bin/env python
"""Print, plot or dump a pipeline schedule as simulated per rank:
`python tools/pipeline_schedule.py --schedule 1f1b --pp 4 --microbatches 8 [--virtual 2] [--png out.png] [--json out.json]`."""

import argparse
import json
import sys

from megaeff.distributed.pipeline.schedule import (
    SCHEDULES,
    build_schedule,
    format_report,
    plot_gantt,
    schedule_report,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
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
        plot_gantt(schedule, args.pp, args.png, args.virtual, args.t_f, args.t_b,
                   title=f"{args.schedule} pp={args.pp} m={args.microbatches} v={args.virtual}")
    if args.json:
        report = schedule_report(args.schedule, args.pp, args.microbatches, args.virtual, args.t_f, args.t_b)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

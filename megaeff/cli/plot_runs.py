"""Plot training loss and validation perplexity of one or more runs from their `metrics.jsonl`.

megaeff-plot-runs runs/a runs/b -o compare.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from megaeff.train.metrics import METRICS_FILE


def _metrics_path(p: Path) -> Path:
    return p / METRICS_FILE if p.is_dir() else p


def read_run(path: Path) -> Dict[str, List[Tuple[int, float]]]:
    """{"train_loss": [(step, v)], "val_loss": [...], "val_ppl": [...]}; a later record for a step wins."""
    path = _metrics_path(Path(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file")
    series: Dict[str, Dict[int, float]] = {"train_loss": {}, "val_loss": {}, "val_ppl": {}}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: not a JSON record") from None
        step = rec.get("step")
        if rec.get("kind") == "train" and "loss" in rec:
            series["train_loss"][step] = rec["loss"]
        elif rec.get("kind") == "eval":
            if "val_loss" not in rec or "val_ppl" not in rec:
                raise ValueError(f"{path}:{lineno}: eval record without val_loss/val_ppl")
            series["val_loss"][step] = rec["val_loss"]
            series["val_ppl"][step] = rec["val_ppl"]
    return {k: sorted(v.items()) for k, v in series.items()}


def plot_runs(paths: Sequence[Path], out: Path, labels: Sequence[str] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = [read_run(Path(p)) for p in paths]
    names = list(labels) or [Path(p).name if Path(p).is_dir() else Path(p).parent.name for p in paths]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run in zip(names, runs):
        if run["train_loss"]:
            steps, vals = zip(*run["train_loss"])
            (line,) = ax_loss.plot(steps, vals, label=f"{name} train", linewidth=1.2)
            color = line.get_color()
        else:
            color = None
        if run["val_loss"]:
            steps, vals = zip(*run["val_loss"])
            ax_loss.plot(steps, vals, "o--", color=color, label=f"{name} val", markersize=4)
            steps, vals = zip(*run["val_ppl"])
            ax_ppl.plot(steps, vals, "o-", color=color, label=name, markersize=4)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_ppl.set(xlabel="step", ylabel="perplexity", title="validation perplexity")
    ax_ppl.set_yscale("log")
    ax_ppl.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_ppl.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    for ax in (ax_loss, ax_ppl):
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories or metrics.jsonl files")
    ap.add_argument("-o", "--out", type=Path, default=Path("loss_curves.png"), help="output PNG")
    ap.add_argument("--labels", nargs="*", default=[], help="legend names, one per run")
    args = ap.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        ap.error("--labels needs one name per run")
    try:
        out = plot_runs(args.runs, args.out, args.labels)
    except (FileNotFoundError, ValueError) as exc:
        print(f"megaeff-plot-runs: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

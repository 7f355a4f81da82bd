"""The method comparison's two figures (tools/bench/methods.py): validation perplexity against training tokens,
and final perplexity against training-state bytes, one panel per corpus, mean over seeds with the spread."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List, Sequence

from megaeff.cli.plot_runs import read_run


def _mean_curve(run_dirs: Sequence[str], tokens_per_step: int):
    """Steps every seed evaluated at; mean, min and max perplexity there."""
    curves = [dict(read_run(Path(d))["val_ppl"]) for d in run_dirs]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    vals = [[c[s] for c in curves] for s in steps]
    return (
        [s * tokens_per_step for s in steps],
        [statistics.fmean(v) for v in vals],
        [min(v) for v in vals],
        [max(v) for v in vals],
    )


def plot_curves(groups: Dict[str, Dict[str, List[dict]]], tokens_per_step: int, out: Path) -> None:
    """groups[corpus][method] = that method's runs (one per seed) at its chosen LR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (corpus, by_method) in zip(axes[0], groups.items()):
        for method, runs in by_method.items():
            x, mean, lo, hi = _mean_curve([r["run_dir"] for r in runs], tokens_per_step)
            (line,) = ax.plot(x, mean, "o-", markersize=3, label=f"{method} (lr {runs[0]['lr']:g})")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set(xlabel="training tokens", ylabel="validation perplexity", title=f"{corpus}: mean, min-max over seeds")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_memory(groups: Dict[str, Dict[str, List[dict]]], out: Path) -> None:
    """Final perplexity (mean, sample std as the error bar) against the training state each method holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (corpus, by_method) in zip(axes[0], groups.items()):
        for method, runs in by_method.items():
            ppl = [r["val_ppl"] for r in runs]
            err = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
            mb = runs[0]["state_bytes"] / 2**20
            ax.errorbar([mb], [statistics.fmean(ppl)], yerr=[err], fmt="o", capsize=4, label=method)
            ax.annotate(method, (mb, statistics.fmean(ppl)), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set(xlabel="training state (MiB: weights, grads, optimizer, indices)", ylabel="final validation perplexity")
        ax.set_title(f"{corpus}: mean +- std over seeds")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)

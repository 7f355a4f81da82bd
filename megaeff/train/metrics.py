"""What a run reports: a live progress line, `metrics.jsonl` in the run directory, and optionally W&B.

Only the main rank logs. Each JSONL record has `kind` ("train" or "eval") and `step`; on resume the file is
trimmed to the resumed step so that it reads as one uninterrupted history.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

from megaeff.errors import ConfigError

if TYPE_CHECKING:
    from megaeff.config.train import LoggingConfig

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else (f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}")


def trim_jsonl(path: Path, max_step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if rec.get("step", 0) <= max_step:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept))


class WandbSink:
    def __init__(self, lcfg: LoggingConfig, run_dir: Path, run_name: str, config: Dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("logging.backend", "wandb is not installed: pip install 'megaeff[wandb]'") from None
        id_file = run_dir / WANDB_ID_FILE
        # A stable id kept in the run directory makes a resumed (or requeued) job append to the same W&B run.
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
        self._wandb = wandb
        self.run = wandb.init(
            project=lcfg.wandb_project,
            entity=lcfg.wandb_entity,
            name=run_name,
            id=run_id,
            resume="allow",
            mode=lcfg.wandb_mode,
            dir=str(run_dir),
            config=config,
        )

    def log(self, record: Dict, step: int) -> None:
        self.run.log({k: v for k, v in record.items() if k not in ("kind", "step")}, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        lcfg: LoggingConfig,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        run_name: str,
        config: Dict,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = Path(run_dir) / METRICS_FILE
        self.progress = lcfg.progress
        self._tty = sys.stdout.isatty()
        self._live = False
        self._wandb: Optional[WandbSink] = None
        self._t0 = time.perf_counter()
        self._start_step = start_step
        if not enabled:
            return
        trim_jsonl(self.path, start_step)
        self._file = open(self.path, "a", buffering=1)
        if lcfg.backend == "wandb":
            self._wandb = WandbSink(lcfg, Path(run_dir), run_name, config)

    def _write(self, record: Dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(record, record["step"])

    def eta(self, step: int) -> float:
        done = step - self._start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self._t0) / done * (self.total_steps - step)

    def log_train(self, step: int, metrics: Dict) -> None:
        if not self.enabled:
            return
        self._write({"kind": "train", "step": step, **metrics})
        if self.progress:
            line = (
                f"step {step:>{len(str(self.total_steps))}}/{self.total_steps} | loss {metrics['loss']:.4f} "
                f"| ppl {metrics['ppl']:.2f} | lr {metrics['lr']:.2e} | gnorm {metrics['grad_norm']:.3f} "
                f"| {format_rate(metrics['tokens_per_s'])} tok/s | mfu {100 * metrics['mfu']:.2f}% "
                f"| {metrics['step_time_s']:.3f} s/step | ETA {format_duration(self.eta(step))}"
            )
            self._end_live_line()
            print(line, flush=True)

    def tick(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Every step, on a terminal only: redraw one status line in place between the logged lines."""
        if not (self.enabled and self.progress and self._tty) or step >= self.total_steps:
            return
        print(
            f"\rstep {step}/{self.total_steps} | loss {loss:.4f} | {format_rate(tokens_per_s)} tok/s "
            f"| ETA {format_duration(self.eta(step))}\033[K",
            end="",
            flush=True,
        )
        self._live = True

    def log_eval(self, step: int, metrics: Dict) -> None:
        if not self.enabled:
            return
        self._write({"kind": "eval", "step": step, **metrics})
        self._end_live_line()
        print(
            f"eval  step {step}: val_loss {metrics['val_loss']:.4f} | val_ppl {metrics['val_ppl']:.3f} "
            f"| {metrics['val_tokens']:,} tokens",
            flush=True,
        )

    def info(self, message: str) -> None:
        if self.enabled:
            self._end_live_line()
            print(message, flush=True)

    def _end_live_line(self) -> None:
        # The live line is transient: erase it so permanent lines never interleave with it.
        if self._live:
            print("\r\033[K", end="")
            self._live = False

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.close()

"""`megaeff-train` / `python -m megaeff.train`: the Hydra entry point.

Before Hydra sees the command line this strips launcher arguments (`--local_rank=N` from the deepspeed
launcher), joins the process group when several ranks were launched, and makes every rank agree on one run
directory (rank 0 picks it and broadcasts it). Ranks other than 0 run with Hydra's output and logging disabled,
so only rank 0 writes `.hydra/`. The working directory is never changed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import hydra
import torch.distributed as dist
from omegaconf import DictConfig

from megaeff.config import check_choice_overrides, conf_dir, register_configs, to_config, validate_world
from megaeff.config.compose import relax_preset_warmup
from megaeff.distributed.dims import ParallelDims, init_process_group, resolve_device, set_collective_timeout
from megaeff.distributed.launch import export_slurm_env, read_launch_env, strip_launcher_args
from megaeff.errors import EXIT_PREEMPTED, EXIT_USAGE, MegaeffError
from megaeff.train.run_dir import RunDirClaim, claim_run_dir, explicit_run_dir

__all__ = ["conf_dir", "main", "run"]  # conf_dir: megaeff.config's, kept importable from here


def _fail(exc: BaseException) -> None:
    print(f"megaeff: error: {exc}", file=sys.stderr, flush=True)
    sys.exit(getattr(exc, "exit_code", EXIT_USAGE))  # DiskFullError: EXIT_DISK_FULL


def run(cfg: DictConfig, claim: Optional[RunDirClaim] = None) -> int:
    """The Hydra task: returns the process exit code. `claim`: the run directory main() checked and locked."""
    from megaeff.train.signals import StopRequest, mark_stopped
    from megaeff.train.trainer import Trainer

    launch = read_launch_env()
    _job_run_dir(cfg)
    try:
        _record_sources(cfg)
        note = relax_preset_warmup(cfg, _task_overrides())
        if note and launch.rank == 0:
            print(f"megaeff: warning: {note}", file=sys.stderr, flush=True)
        config = to_config(cfg)  # the section checks, once
        validate_world(config, launch.world_size)  # once, before any process group of the run's layout
        device = resolve_device(config.train.device, launch.local_rank)
        dims = ParallelDims.from_config(config.parallel, launch.world_size, launch.rank, device)
        dims.build_groups()
        set_collective_timeout(dims, config.train.collective_timeout_s)
        run_dir = Path(config.run_dir)
        # Every rank calls it, whatever it holds: rank 0 alone decides whether main()'s claim covers this job's
        # directory (a sweep job's own one), so no rank can skip the broadcast another one waits in.
        claim = claim_run_dir(run_dir, is_main=dims.is_main, distributed=launch.is_distributed, held=claim)
        run_dir.mkdir(parents=True, exist_ok=True)
        with claim, StopRequest() as stop:  # rank 0 holds <run_dir>/.lock until the run ends
            trainer = Trainer(config, dims, run_dir, stop=stop)
            try:
                with trainer.watchdog:  # train.hang_timeout_s (megaeff/train/watchdog.py)
                    result = trainer.fit()
            finally:
                trainer.close()
    except MegaeffError as exc:
        _fail(exc)
    if result.preempted:
        mark_stopped(result.step, result.checkpoint)  # the launch scripts' exit 75, whatever the launcher says
        return EXIT_PREEMPTED
    if dims.is_main and result.final_eval is not None:
        ev = result.final_eval
        baseline = trainer.data.unigram_ppl
        print(
            f"final: step {result.step} | val_loss {ev['val_loss']:.4f} | val_ppl {ev['val_ppl']:.3f}"
            + (f" ({trainer.data.baseline_name} {baseline:.2f})" if baseline else ""),
            flush=True,
        )
        if config.train.plot:
            from megaeff.cli.plot_runs import plot_runs

            png = plot_runs([run_dir], run_dir / "loss_curve.png", [config.name])
            print(f"loss curve: {png}", flush=True)
        print(f"metrics: {run_dir / 'metrics.jsonl'}", flush=True)
    return 0


def _task_overrides() -> List[str]:
    """The command line's overrides of this job (a sweep job's values included); none outside Hydra's main."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _record_sources(cfg: DictConfig) -> None:
    """`optim.sources`: where each optimizer value came from, replayed from this job's command line and group
    choices (megaeff/config/provenance.py); every rank of a torchrun/deepspeed launch computes the same."""
    from hydra.core.hydra_config import HydraConfig

    from megaeff.config.provenance import record_sources

    if HydraConfig.initialized():  # run() called without Hydra's main: nothing to attribute
        record_sources(cfg, _task_overrides(), HydraConfig.get().runtime.choices, conf_dir())


def _job_run_dir(cfg: DictConfig) -> None:
    """Under multirun (-m) every job trains in its own directory, `<run_dir>/<job number>` (Hydra's sweep dir
    and subdir, conf/config.yaml), which also holds that job's `.hydra/`: jobs sharing one run_dir would resume
    each other's checkpoints."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return  # run() called without Hydra's main
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        cfg.run_dir = hydra_cfg.runtime.output_dir


def check_overrides(argv) -> None:
    """Hydra reports a malformed override, or a value outside a field's choices, in several lines of its own;
    name it in one here, before any process group forms."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue  # Hydra's own flags (--cfg job, --multirun, ...) and their values
        try:
            parser.parse_override(arg)
        except HydraException as exc:  # the grammar raises its base class for some syntax errors
            raise ValueError(f"malformed override '{arg}': {str(exc).splitlines()[0]}") from None
    check_choice_overrides(argv)


def _agree_on_run_dir(overrides):
    if any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in overrides):
        return overrides
    stamp = [time.strftime("%Y-%m-%d_%H-%M-%S")]
    dist.broadcast_object_list(stamp, src=0)
    return overrides + [f"run_dir=runs/{stamp[0]}"]


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, local_rank = strip_launcher_args(argv)
        check_overrides(argv)
        if local_rank is not None:
            os.environ.setdefault("LOCAL_RANK", str(local_rank))
        launch = read_launch_env()
        export_slurm_env(launch)
        config_path = conf_dir()
    except (ValueError, MegaeffError) as exc:
        _fail(exc)
    if launch.is_distributed:
        init_process_group()
        if launch.rank == 0:
            print(f"megaeff: {launch.describe()}", flush=True)
        argv = _agree_on_run_dir(argv)
    try:  # before Hydra writes .hydra/ into it: a file, an unwritable path or another run's directory stops here
        path = explicit_run_dir(argv)
        claim = path and claim_run_dir(path, is_main=launch.rank == 0, distributed=launch.is_distributed)
    except MegaeffError as exc:
        _fail(exc)
    if launch.is_distributed:
        if launch.rank > 0:
            argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    register_configs()
    exit_code = {"code": 0}

    def task(cfg: DictConfig) -> None:
        if exit_code["code"] == EXIT_PREEMPTED:
            return  # a sweep stopped on request: its later jobs start when the sweep is rerun
        exit_code["code"] = run(cfg, claim)

    prog = sys.argv[0]
    sys.argv = [prog] + argv
    try:
        hydra.main(version_base="1.3", config_path=config_path, config_name="config")(task)()
    finally:
        if launch.is_distributed and dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(exit_code["code"])


if __name__ == "__main__":
    main()

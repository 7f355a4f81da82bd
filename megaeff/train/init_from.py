"""`model.init_from`: start a run from a Hugging Face LLaMA checkpoint, in any layout.

Two hooks, both in the trainer:

1. `materialization_weights(cfg)` goes to `parallelize`: for `method=lost` the pretrained dense weights replace
   the seed's draws of W0 in the model's own init (megaeff/models/init.py `Initializer`), so LOST's channel set is
   derived from the pretrained W0 on every rank and in every layout. It is passed on resume too: the channel set
   is regenerated, never stored, and the checkpoint's index checksum must match it. Other methods derive nothing
   from W0 (SLTrain's support comes from the seed alone), so they get None and read the directory only once.
2. `load_pretrained(...)` after `parallelize`, when no checkpoint was resumed: the logical state converted by
   megaeff/interop/hf_import.py (only the keys this rank's module holds: a pipeline stage converts its own
   layers) goes through the checkpoint path, `ParallelModel.state.shard_model` then `load_state_dict`, so every
   layout takes its own shards of it. Each projection's relative reconstruction error (gathered over pipeline
   stages) goes to the log and to `init_from.json` in the run directory.

Cost: every rank converts the layers it holds (the SVDs in float64, one thread, so all ranks agree bit for bit);
for `lost` the SVD runs twice (once in the model's init, once in the conversion that reports the errors).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional

import torch

from megaeff.distributed.comm import all_reduce_
from megaeff.errors import CheckpointError
from megaeff.interop.hf_import import import_hf, pretrained_weights
from megaeff.interop.layers import layer_specs, logical_model

if TYPE_CHECKING:
    from megaeff.config.schema import Config
    from megaeff.distributed.dims import ParallelDims
    from megaeff.distributed.parallel_model import ParallelModel

REPORT_FILE = "init_from.json"


def materialization_weights(cfg: Config) -> Optional[Mapping[str, torch.Tensor]]:
    """Dense weights for the model's init (LOST only, see the module docstring), else None."""
    if cfg.model.init_from and cfg.method.name == "lost":
        return pretrained_weights(cfg.model.init_from)
    return None


def gather_errors(errors: Dict[str, float], names: List[str], dims: ParallelDims) -> Dict[str, float]:
    """Every stage's errors on every rank (a pipeline stage converts only its own layers): one max-all-reduce over
    pp of a vector holding each projection's error where this stage has it, -inf elsewhere."""
    if dims.pp == 1:
        return errors
    t = torch.tensor([errors.get(n, -math.inf) for n in names], dtype=torch.float64, device=dims.device)
    all_reduce_(t, dims.group("pp"), "pp", dims.comm_stats, op=torch.distributed.ReduceOp.MAX)
    return {n: float(v) for n, v in zip(names, t.tolist()) if v > -math.inf}


def load_pretrained(
    cfg: Config, parallel: ParallelModel, dims: ParallelDims, run_dir: Path, log: Callable[[str], None]
) -> Dict[str, float]:
    """Load `model.init_from` into this rank's part of the model (collective over pp for the error report);
    returns every projection's reconstruction error."""
    path = cfg.model.init_from
    module = parallel.module
    result = import_hf(path, cfg, keys=module.state_dict().keys())
    state = result.state
    if parallel.state.sharded:
        try:
            state = parallel.state.shard_model(state)
        except (ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(path, f"does not fit the configured model and layout: {exc}") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"weights do not match the configured model: {exc}") from None
    errors = gather_errors(result.errors, [s.name for s in layer_specs(logical_model(cfg))], dims)
    log(f"init_from: {path} converted to method={cfg.method.name}; relative reconstruction error per projection:")
    for name, err in errors.items():
        log(f"init_from:   {name} {err:.6e}")
    if errors:
        worst = max(errors, key=errors.get)
        log(f"init_from: max {errors[worst]:.6e} ({worst}), mean {sum(errors.values()) / len(errors):.6e}")
    if dims.is_main:
        report = {"init_from": path, "method": str(cfg.method.name), "errors": errors}
        (Path(run_dir) / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return errors

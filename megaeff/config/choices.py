"""The fixed choices of the config: one `Choice` enum per field, so composition rejects a bad value.

OmegaConf matches a string against the member *names* (Literal types are not supported by OmegaConf 2.3), so
every member is named exactly what a user types, "1f1b" included (hence the functional API). Members are also
`str`: they compare, hash, print and format as their value, so `cfg.parallel.dp_impl == "fssdp"`, dict lookups
keyed by strings, f-strings and `json.dumps` behave as with plain strings. `to_plain`/`to_yaml`
(megaeff.config.schema) turn a config into builtin types for checkpoints and W&B.

This module imports nothing from megaeff but megaeff.errors: the implementation packages keep their own
registries, and tests/unit/test_config.py checks that they match the enums below.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Iterable, Tuple, Type

from megaeff.errors import ConfigError


class Choice(str, Enum):
    """A string enum whose members behave like their string value everywhere but in `isinstance`."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return str.__repr__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)

    def __hash__(self) -> int:
        return str.__hash__(self)

    @classmethod
    def values(cls) -> Tuple[str, ...]:
        return tuple(m.value for m in cls)


def _choice(name: str, values: Iterable[str]) -> Type[Choice]:
    """A `Choice` subclass whose member names equal their values (`PpSchedule("1f1b")`, or by name)."""
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


# model
AttentionBackend = _choice("AttentionBackend", ("auto", "sdpa", "math", "flash"))
# method (megaeff.layers: linear.LINEAR_METHODS, sltrain.PATHS, lost.ACTIVATIONS, lost.SPARSE_INITS)
LinearMethod = _choice("LinearMethod", ("dense", "lowrank", "sltrain", "lost"))
SltrainPath = _choice("SltrainPath", ("auto", "dense", "sparse"))
SltrainCosts = _choice("SltrainCosts", ("measured", "fixed"))  # megaeff.layers.sltrain_costs.COSTS
LostActivation = _choice("LostActivation", ("none", "silu"))
LostSparseInit = _choice("LostSparseInit", ("w0", "complement"))
# optim (megaeff.precision.fp8.FORMATS, megaeff.kernels.fp8_adamw.PROBES)
Optimizer = _choice("Optimizer", ("adamw", "coat_adamw", "galore"))
# GaLore (megaeff.optim.galore_projector: PROJECTORS, SIDES)
GaloreProjector = _choice("GaloreProjector", ("svd", "randomized"))
GaloreSide = _choice("GaloreSide", ("auto", "left", "right"))
OptimImpl = _choice("OptimImpl", ("auto", "fused", "foreach", "single", "apex"))
LrSchedule = _choice("LrSchedule", ("cosine", "constant"))
Fp8Format = _choice("Fp8Format", ("e4m3", "e5m2"))
Fp8Backend = _choice("Fp8Backend", ("auto", "cuda", "triton", "cpp", "torch"))
# precision
Precision = _choice("Precision", ("fp32", "bf16", "coat"))
ParamDtype = _choice("ParamDtype", ("fp32", "bf16"))
# parallel (megaeff.distributed: pipeline.schedule.PIPELINE_SCHEDULES, context_parallel.attention.IMPLS,
# context_parallel.sharding.SHARDINGS, fssdp.layout.GATHER_DTYPES / REDUCE_DTYPES, expert_parallel.experts.IMPLS)
PpSchedule = _choice("PpSchedule", ("gpipe", "1f1b", "interleaved"))
CpImpl = _choice("CpImpl", ("ring", "lightseq", "ulysses"))
CpSharding = _choice("CpSharding", ("contiguous", "zigzag"))
DpImpl = _choice("DpImpl", ("allreduce", "fssdp"))
FssdpGatherDtype = _choice("FssdpGatherDtype", ("fp32", "bf16", "fp8"))
FssdpReduceDtype = _choice("FssdpReduceDtype", ("fp32", "bf16"))
ExpertImpl = _choice("ExpertImpl", ("replicated", "fssdp", "ep"))
# data (megaeff.data: builder.DATASETS, tokenizer.TOKENIZERS)
Dataset = _choice("Dataset", ("default", "indexed", "pydocs"))
TokenizerKind = _choice("TokenizerKind", ("byte", "hf", "sentencepiece"))
# train (megaeff.train.nonfinite.POLICIES)
NonfinitePolicy = _choice("NonfinitePolicy", ("stop", "skip"))
# logging
LoggingBackend = _choice("LoggingBackend", ("jsonl", "wandb"))
WandbMode = _choice("WandbMode", ("offline", "online", "disabled"))


def require_choice(value, field: str, choice: Type[Choice]) -> None:
    """Dataclasses built in Python skip OmegaConf's check; the validators repeat it with the same message."""
    if value not in choice.values():
        raise ConfigError(field, f"must be one of {', '.join(choice.values())}; got {value!r}")


def require_positive(value, field: str) -> None:
    """> 0 and finite: NaN fails every comparison, so `value <= 0` alone would let it through."""
    if value is None or not 0 < value < math.inf:
        raise ConfigError(field, f"must be a positive finite number, got {value}")


def require_nonnegative(value, field: str, hint: str = "") -> None:
    """>= 0 and finite (NaN and inf included in the refusal)."""
    if value is None or not 0 <= value < math.inf:
        raise ConfigError(field, f"must be a finite number >= 0{hint}, got {value}")

"""Typed configuration schema.

Every Hydra group in `conf/` is backed by one of these dataclasses, registered in Hydra's ConfigStore, so a
misspelled key, a value of the wrong type or a choice outside its enum (megaeff/config/choices.py) fails when
the config is composed, not hours into a run. Nested defaults use `default_factory` (mutable dataclass defaults
break on Python >= 3.11).

Each section lives in its own module next to its `validate_<section>` (the cross-field checks a schema cannot
express); `to_config` runs them all once, right after composition. What needs more than the config runs later,
once: `validate_world` (the world size, before any process group) and `check_tokenizer_vocab` (the tokenizer,
once the data is built).
"""

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict

from hydra.core.config_store import ConfigStore

from megaeff.config.data import DataConfig, validate_data
from megaeff.config.model import MethodConfig, ModelConfig, validate_method, validate_model
from megaeff.config.optim import (
    OptimConfig,
    PrecisionConfig,
    validate_galore,
    validate_grad_accum_fusion,
    validate_in_backward,
    validate_optim,
    validate_precision,
)
from megaeff.config.parallel import ParallelConfig, validate_parallel
from megaeff.config.train import LoggingConfig, TrainConfig, validate_logging, validate_train
from megaeff.errors import ConfigError


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Run name (experiment files set it); shows up in logs and W&B.
    name: str = "megaeff"
    # Every rank of a run agrees on this directory; Hydra's own files go in it too (rank 0 only).
    run_dir: str = "runs/default"


def validate_sections(cfg: Config) -> None:
    """Every check that needs nothing but the config; raises ConfigError naming the first field at fault."""
    validate_model(cfg.model)
    validate_method(cfg.method, cfg.model)
    validate_train(cfg.train)
    validate_optim(cfg.optim, cfg.train.steps)
    validate_precision(cfg.precision)
    validate_data(cfg.data, cfg.model)
    validate_logging(cfg.logging)
    validate_parallel(cfg.parallel, cfg)
    validate_in_backward(cfg)
    validate_galore(cfg)
    validate_grad_accum_fusion(cfg)


def register_configs() -> None:
    """Register the root schema; `conf/config.yaml` lists it first, so every group file is checked against it."""
    ConfigStore.instance().store(name="megaeff_schema", node=Config)


def _reject_unknown_keys(node: Any, schema: type, path: str) -> None:
    """`+group.key=value` bypasses struct mode; a key the schema does not know would then vanish silently."""
    from omegaconf import DictConfig

    known = {f.name: f for f in fields(schema)}
    for key in node.keys():
        if key == "hydra":
            continue
        if key not in known:
            raise ConfigError(f"{path}{key}", f"unknown key; {schema.__name__} has: {', '.join(known)}")
        child, ftype = node[key], known[key].type
        if is_dataclass(ftype) and isinstance(child, DictConfig):
            _reject_unknown_keys(child, ftype, f"{path}{key}.")


def to_config(cfg: Any) -> Config:
    """Turn a composed DictConfig into the typed dataclass tree and run the section validators."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    _reject_unknown_keys(cfg, Config, "")
    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        raise ConfigError(
            str(exc.full_key), "is required (the config leaves it as ???); set it on the command line"
        ) from None
    if not isinstance(obj, Config):
        raise TypeError(f"expected a megaeff Config, got {type(obj).__name__}")
    validate_sections(obj)
    return obj


def to_plain(cfg: Config) -> Dict[str, Any]:
    """The config as builtin types only (choices as plain strings): for W&B, JSON and `torch.load(weights_only)`."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (choices by name, i.e. as the user typed them), as checkpoints keep it."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


__all__ = [
    "Config",
    "ModelConfig",
    "MethodConfig",
    "OptimConfig",
    "PrecisionConfig",
    "ParallelConfig",
    "DataConfig",
    "TrainConfig",
    "LoggingConfig",
    "register_configs",
    "to_config",
    "to_plain",
    "to_yaml",
    "validate_sections",
]

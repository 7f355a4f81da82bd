"""Cross-field validation: the checks a schema cannot express, each naming the field at fault.

The checks live next to their sections (megaeff/config/{model,optim,data,train,parallel}.py). A launch runs each
once: `to_config` the section checks, the CLI `validate_world`, the trainer `check_tokenizer_vocab`.
`validate_config` runs whichever of them the arguments allow, for configs built in Python (tests, tools).
"""

from typing import Optional

from megaeff.config.model import check_tokenizer_vocab, layer_shapes
from megaeff.config.parallel import resolve_degrees, validate_world
from megaeff.config.schema import Config, validate_sections

__all__ = [
    "validate_config",
    "validate_sections",
    "validate_world",
    "check_tokenizer_vocab",
    "layer_shapes",
    "resolve_degrees",
]


def validate_config(cfg: Config, world_size: Optional[int] = None, tokenizer_vocab: Optional[int] = None) -> None:
    """Raise ConfigError for the first inconsistency found; return None when the config is usable."""
    validate_sections(cfg)
    if world_size is not None:
        validate_world(cfg, world_size)
    if tokenizer_vocab is not None:
        check_tokenizer_vocab(cfg.model, tokenizer_vocab)

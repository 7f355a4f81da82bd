from megaeff.config.choices import Choice
from megaeff.config.compose import check_choice_overrides, compose, compose_raw, conf_dir
from megaeff.config.schema import Config, register_configs, to_config, to_plain, to_yaml, validate_sections
from megaeff.config.validate import check_tokenizer_vocab, validate_config, validate_world

__all__ = [
    "Choice",
    "Config",
    "check_choice_overrides",
    "check_tokenizer_vocab",
    "compose",
    "compose_raw",
    "conf_dir",
    "register_configs",
    "to_config",
    "to_plain",
    "to_yaml",
    "validate_config",
    "validate_sections",
    "validate_world",
]

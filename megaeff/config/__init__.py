from megaeff.config.schema import Config, register_configs, to_config
from megaeff.config.validate import validate_config

__all__ = ["Config", "register_configs", "to_config", "validate_config"]

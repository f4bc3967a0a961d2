"""Config schemas, their registration in Hydra's ConfigStore, and validation."""
from feda2v.config.schema import Feda2vConfig
from feda2v.config.validate import flatten_dotted, load_config, to_plain

__all__ = ["Feda2vConfig", "flatten_dotted", "load_config", "to_plain"]

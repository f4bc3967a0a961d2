"""Config: the dataclass schema (conf/schema.yaml is generated from it), validation, the published aliases."""
from feda2v.config.schema import Feda2vConfig
from feda2v.config.validate import flatten_dotted, load_config, to_plain

__all__ = ["Feda2vConfig", "flatten_dotted", "load_config", "to_plain"]

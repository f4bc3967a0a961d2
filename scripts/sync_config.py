"""Regenerate conf/schema.yaml (from the dataclass schema) and params.yaml (the composed default).

Run after changing src/feda2v/config/schema.py or conf/: `.venv/bin/python scripts/sync_config.py`.
tests/test_config.py fails while either file is stale.
"""
from pathlib import Path

from feda2v.config.files import composed_default_yaml, schema_yaml

ROOT = Path(__file__).resolve().parents[1]
(ROOT / "conf" / "schema.yaml").write_text(schema_yaml())
(ROOT / "params.yaml").write_text(composed_default_yaml(ROOT / "conf"))
print("wrote conf/schema.yaml and params.yaml")

"""What every data source provides (its own module so that sources.py, which picks a source by
name, and each source module can both import it without importing each other)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np


@dataclass
class Source:
    name: str
    classes: list[str]
    descriptions: list[str]  # one short sentence per class, embedded as its text condition
    labels: np.ndarray  # int64 [n]
    # features(variant, idx) -> float64 [len(idx), feature_dim]; variant 1 = the skewed library
    features: Callable[[int, np.ndarray], np.ndarray]
    feature_dim: int
    info: dict = field(default_factory=dict)  # JSON-able provenance for the manifest
    variants: int = 1  # how many feature variants exist (2 when a feature skew is available)
    # Progress hook, set by prepare: a source whose features() works class by class (rendering)
    # calls it once per class and variant with (class name, came from cache).
    on_class: Optional[Callable[[str, bool], None]] = None
    reports_classes: bool = False  # whether features() calls on_class

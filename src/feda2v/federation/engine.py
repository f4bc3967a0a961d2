"""Engines run the rounds of a Federation. ``inprocess`` is the embedded default: one process, no
services, deterministic. Other engines (Flower) must drive the same Federation code."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from feda2v.errors import ConfigError


class InProcessEngine:
    name = "inprocess"

    def run(self, federation, start_round: int, end_round: int,
            on_step: Optional[Callable[[], None]] = None,
            on_node: Optional[Callable[[object], None]] = None) -> Iterator:
        """Yield each round's RoundResult; the caller checkpoints/logs between rounds."""
        for r in range(start_round, end_round + 1):
            yield federation.run_round(r, on_step=on_step, on_node=on_node)


def make_engine(name: str):
    if name == "inprocess":
        return InProcessEngine()
    if name == "flower":  # optional extra: imported only when asked for
        try:
            import flwr  # noqa: F401
        except ImportError:
            raise ConfigError("federation.engine=flower needs the Flower extra (flwr is not installed); install "
                              "it with: pip install -e '.[flower]' (or use federation.engine=inprocess)") from None
        from feda2v.federation.flower_engine import FlowerEngine

        return FlowerEngine()
    raise ConfigError(f"federation.engine={name} is not available in this build; use inprocess")

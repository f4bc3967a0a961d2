"""store part (see DESIGN.md): the GeneratorStore, its spec, and the one optimizer factory."""
from feda2v.store.optim import make_optimizer
from feda2v.store.spec import OptimizerSpec, StoreSpec
from feda2v.store.store import DISCRIMINATOR, GENERATOR, GeneratorStore, ResetEvent

__all__ = ["GeneratorStore", "StoreSpec", "OptimizerSpec", "ResetEvent", "make_optimizer", "GENERATOR", "DISCRIMINATOR"]

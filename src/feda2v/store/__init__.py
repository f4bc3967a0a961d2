"""store part (see DESIGN.md): the GeneratorStore, its spec, the kinds table, and the one optimizer factory."""
from feda2v.store import kinds
from feda2v.store.optim import make_optimizer
from feda2v.store.spec import OptimizerSpec, StoreSpec
from feda2v.store.store import DISCRIMINATOR, GENERATOR, RESET_POLICIES, GeneratorStore, ResetEvent

__all__ = ["GeneratorStore", "StoreSpec", "OptimizerSpec", "ResetEvent", "RESET_POLICIES", "kinds", "make_optimizer",
           "GENERATOR", "DISCRIMINATOR"]

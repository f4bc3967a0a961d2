"""models part (see DESIGN.md): generator architectures, the node classifier, losses. No optimizers."""
from feda2v.models.classifier import Classifier
from feda2v.models.functional import stacked_linear, stacked_sequential
from feda2v.models.generators import (
    ARCHITECTURES,
    Architecture,
    CVAE,
    VAE,
    GANDiscriminator,
    GANGenerator,
    ProjectionDiscriminator,
    build_model,
    constructor_args,
    recorded_kwargs,
)
from feda2v.models.init import clone_structure, init_parameters
# the published FedA2V architectures (generator.arch=fedgfe*), registered in ARCHITECTURES on import
from feda2v.models.published import PUBLISHED_ARCHITECTURES
from feda2v.models.losses import (
    bce_logits_per_sample,
    beta_schedule,
    vae_kl_per_sample,
    vae_recon_per_sample,
)

__all__ = [
    "ARCHITECTURES", "Architecture", "constructor_args", "recorded_kwargs", "CVAE", "VAE", "Classifier", "GANDiscriminator", "GANGenerator",
    "ProjectionDiscriminator", "build_model",
    "clone_structure", "init_parameters", "stacked_linear", "stacked_sequential", "beta_schedule", "bce_logits_per_sample",
    "vae_kl_per_sample", "vae_recon_per_sample", "PUBLISHED_ARCHITECTURES",
]

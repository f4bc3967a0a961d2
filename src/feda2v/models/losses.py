"""Per-sample losses (reduced by the caller with a mask) and the β warm-up schedule."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def beta_schedule(step: Tensor, beta_max: float, warmup_steps: int) -> Tensor:
    """β = beta_max · min(1, step / warmup_steps), on the key's persistent optimizer step count.

    ``step`` counts the key's completed optimizer steps, so β keeps rising across rounds and
    nodes and only restarts when the key is reset (a fresh model warms up again).
    """
    if warmup_steps <= 0:
        return torch.full_like(step, float(beta_max))
    return beta_max * torch.clamp(step / float(warmup_steps), max=1.0)


def vae_recon_per_sample(recon: Tensor, x: Tensor) -> Tensor:
    """Squared error summed over features (Gaussian log-likelihood up to constants), per sample."""
    return (recon - x).pow(2).sum(-1)


def output_nll_per_sample(recon: Tensor, x: Tensor, log_var: Tensor) -> Tensor:
    """Gaussian negative log-likelihood (up to constants) of ``x`` under N(recon, diag(exp(log_var))),
    summed over features, per sample, with the residual detached: it fits the learned output
    variance (per feature, [K, 1, D] or [D]) to the squared residual and trains nothing else."""
    r2 = (recon.detach() - x).pow(2)
    return 0.5 * (r2 * torch.exp(-log_var) + log_var).sum(-1)


def vae_kl_per_sample(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent dimensions, per sample."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(-1)


def vae_kl_to_prior_per_sample(mu: Tensor, logvar: Tensor, prior_mu: Tensor, prior_logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) summed over latent dimensions, per sample."""
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) * torch.exp(-prior_logvar) - 1.0).sum(-1)


def bce_logits_per_sample(logits: Tensor, target: float) -> Tensor:
    """Binary cross-entropy with logits against a constant target (1 = real, 0 = fake)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none")


# GAN objectives, per sample (logits are D's raw outputs). "nonsaturating" is the original GAN's
# discriminator loss with the generator maximising log D(G(z)) instead of minimising
# log(1 - D(G(z))) (Goodfellow et al., 2014), whose gradient does not vanish while D rejects the
# fakes; "hinge" is the margin form used with projection discriminators (Miyato et al., 2018).
GAN_LOSSES = ("nonsaturating", "hinge")


def gan_d_loss_per_sample(real_logit: Tensor, fake_logit: Tensor, loss: str) -> Tensor:
    if loss == "hinge":
        return F.relu(1.0 - real_logit) + F.relu(1.0 + fake_logit)
    return F.softplus(-real_logit) + F.softplus(fake_logit)  # -log sigmoid(real) - log(1 - sigmoid(fake))


def gan_g_loss_per_sample(fake_logit: Tensor, loss: str) -> Tensor:
    if loss == "hinge":
        return -fake_logit
    return F.softplus(-fake_logit)  # -log sigmoid(fake)


def r1_per_sample(grad_real: Tensor) -> Tensor:
    """||grad_x D(x)||^2 at real samples (Mescheder et al., 2018); the caller weights it gamma/2."""
    return grad_real.pow(2).sum(-1)

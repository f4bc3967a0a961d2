"""Generator architectures: VAE, conditioned VAE, and a conditional GAN (generator + discriminator).

Each model is a plain ``nn.Module`` of ``nn.Sequential`` MLPs, so parameter names are stable
(``encoder.0.weight``, ``net.4.bias``): checkpoints map them by name. (The published FedA2V
architectures, for migrated runs, are in ``published.py``.)
Besides the usual ``forward``, each model offers ``*_stacked`` methods that evaluate K models of
the same architecture at once from stacked parameters (see ``functional.py``); the module they are
called on only supplies the structure, never its own parameter values.
Models own no optimizer (the store does).
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from feda2v.errors import CheckpointError
from feda2v.models.functional import modulate, stacked_sequential
from feda2v.models.init import init_linears, init_parameters, linear


def _default_gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _cat(a: Tensor, cond: Tensor | None) -> Tensor:
    return a if cond is None else torch.cat([a, cond], dim=-1)


def constructor_args(cls: type[nn.Module]) -> tuple[str, ...]:
    """The architecture's constructor arguments (what a checkpoint records), ``gen`` excluded."""
    return tuple(n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "gen"))


def recorded_kwargs(cls: type[nn.Module], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` as a checkpoint records them: an argument with a default (one added after
    checkpoints existed) only where it differs from that default, so an architecture built as
    before records, and compares, exactly as before (older checkpoints keep loading)."""
    params = inspect.signature(cls.__init__).parameters
    return {n: v for n, v in kwargs.items() if params[n].default is inspect.Parameter.empty or v != params[n].default}


class Architecture(nn.Module):
    """Base of every generator architecture: each keeps its constructor arguments as attributes of
    the same name, so ``kwargs()`` (what rebuilds it) is derived, never listed per class."""

    def kwargs(self) -> dict[str, Any]:
        return recorded_kwargs(type(self), {n: getattr(self, n) for n in constructor_args(type(self))})


# The learned output variance (output_variance=True), one per feature, shared by all samples, is
# held as log(sigma^2) / OUTPUT_LOG_VAR_SCALE: Adam moves a parameter by about lr per step whatever
# its gradient's size, and the scale lets log(sigma^2) travel from 0 (sigma^2 = 1, a z-scored
# feature's variance) to the residual's (about -2 here) within a per-class key's ~800 steps; at
# scale 1 those keys ended at sigma^2 ~0.2 against ~0.06 fitted (README, generator comparison).
OUTPUT_LOG_VAR = "output_scaled_log_var"
OUTPUT_LOG_VAR_SCALE = 8.0

# Every Gaussian the VAEs emit (the posterior q(z | x), the learned prior p(z | c)) has its
# log-variance bounded to this range. Why: exp(0.5 * logvar) is the reparametrised z's scale, so an
# encoder output that runs away (on digits' Dirichlet split, whose z-scored corner pixels reach 22)
# makes z, and that step's gradient, exponentially large: logvar 27 gave a gradient norm of 8e11
# against ~20 typically, and the run went non-finite (`make compare`; README, "The log-variance
# bound"). A healthy run stays inside (instruments, 30 rounds, unified and per class:
# posterior -16.6 to 8.4, prior -1.0 to 4.9), where the bound is the identity in value and gradient,
# so those runs train bit for bit as before. Outside, the value is clamped but the gradient passes
# as if it were not: a plain clamp's zero gradient left the units stuck out there (digits trained
# to a largest node reconstruction error of 81 against 9 this way).
LOGVAR_BOUNDS = (-30.0, 10.0)


def gaussian_params(out: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, log-variance within LOGVAR_BOUNDS) of a layer output holding [mean, logvar] side by side."""
    mean, logvar = out.chunk(2, dim=-1)
    # the clamped value with the gradient of the unclamped one (identity inside the range)
    return mean, logvar + (logvar.clamp(*LOGVAR_BOUNDS) - logvar).detach()


def output_log_var(scaled: Tensor) -> Tensor:
    """log(sigma^2) per feature from the stored parameter."""
    return OUTPUT_LOG_VAR_SCALE * scaled


# FiLM (``film``): the condition's (scale, shift) for the generating network's two hidden Linear
# layers (the VAE's decoder.0 and decoder.2, the GAN generator's net.0 and net.2), each applied
# before the activation that follows it.
FILM_LAYERS = 2


def _film_pairs(out: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The modulation layer's output [..., 2 h L] as (scale, shift) for each of the L hidden layers."""
    parts = out.chunk(2 * FILM_LAYERS, dim=-1)
    return [(parts[2 * i], parts[2 * i + 1]) for i in range(FILM_LAYERS)]


def _zero_layers(module: nn.Module, *names: str) -> None:
    """Zero the named sub-modules ``module`` has (the layers that start as "nothing yet": the
    conditional prior at N(0, I), the FiLM modulation at none), after their draws were taken."""
    for name in names:
        if name in module._modules:
            for p in module._modules[name].parameters():
                p.zero_()


def _modulated(seq: nn.Sequential, x: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``seq`` applied to ``x`` with ``pairs`` modulating its first Linear layers' outputs (the plain
    twin of ``stacked_sequential(..., modulation=pairs)``)."""
    linears = 0
    for layer in seq:
        x = layer(x)
        if isinstance(layer, nn.Linear):
            if linears < len(pairs):
                x = modulate(x, *pairs[linears])
            linears += 1
    return x


class _VAEBase(Architecture):
    """Encoder and decoder MLPs; with ``output_variance`` also a learned per-feature variance
    sigma^2 of the Gaussian likelihood p(x | z) = N(decoder(z), diag(sigma^2)), which sampling draws from.

    Why: the decoder mean alone is a smooth function of z, and only a few latent dimensions stay
    active, so mean-only samples of a class lie on a thin manifold with too little within-class
    spread; a classifier trained on them (TSTR) learns boundaries that real data crosses. Sampling
    the likelihood adds the spread the latents do not carry. The variance is fitted to the
    detached residual (``losses.output_nll_per_sample``), so the decoder's own training (squared
    error + beta KL) is unchanged; a sigma-VAE-style calibrated likelihood weighting the squared
    error (Rybkin et al., 2021) was measured worse here (it lowers the effective beta; README).
    """

    conditional: bool = False

    def __init__(self, feature_dim: int, latent_dim: int, hidden_dim: int, condition_dim: int,
                 gen: torch.Generator | None = None, output_variance: bool = False,
                 conditional_prior: bool = False, film: bool = False):
        super().__init__()
        self.feature_dim, self.latent_dim, self.hidden_dim = feature_dim, latent_dim, hidden_dim
        self.condition_dim, self.output_variance = condition_dim, bool(output_variance)
        self.conditional_prior, self.film = bool(conditional_prior), bool(film)
        d, z, h, c = feature_dim, latent_dim, hidden_dim, condition_dim
        # The encoder's last layer emits [mu, logvar] side by side.
        self.encoder = nn.Sequential(linear(d + c, h), nn.SiLU(), linear(h, h), nn.SiLU(), linear(h, 2 * z))
        self.decoder = nn.Sequential(linear(z + c, h), nn.SiLU(), linear(h, h), nn.SiLU(), linear(h, d))
        if self.output_variance:
            self.output_scaled_log_var = nn.Parameter(torch.empty(d))
        if self.conditional_prior:  # after the encoder and decoder: their init draws stay the same
            self.prior = nn.Sequential(linear(c, 2 * z))
        if self.film:  # last of all, for the same reason: [scale, shift] per hidden layer
            self.modulation = nn.Sequential(linear(c, 2 * h * FILM_LAYERS))
        init_parameters(self, gen or _default_gen())

    @torch.no_grad()
    def init_from(self, gen: torch.Generator) -> None:
        """The Linear layers as ``init_parameters`` draws them (the same draws with or without the
        variance, which draws nothing); the output variance starts at 1 (log 0), a z-scored feature's;
        the conditional prior starts as N(0, I) for every condition and the decoder's modulation as
        none (zero weights, drawn last)."""
        init_linears(self, gen)
        if self.output_variance:
            self.output_scaled_log_var.zero_()
        _zero_layers(self, "prior", "modulation")

    def _c(self, cond: Tensor | None) -> Tensor | None:
        if not self.conditional:
            return None
        if cond is None:
            raise ValueError(f"{type(self).__name__} needs a condition")
        return cond

    # -- one model ---------------------------------------------------------------------------
    def encode(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return gaussian_params(self.encoder(_cat(x, self._c(cond))))

    def decode(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        c = self._c(cond)
        if not self.film:
            return self.decoder(_cat(z, c))
        return _modulated(self.decoder, _cat(z, c), _film_pairs(self.modulation(c)))

    def forward(self, x: Tensor, cond: Tensor | None = None, *, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, mu, logvar) with the reparametrisation noise ``eps`` given by the caller."""
        mu, logvar = self.encode(x, cond)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode(z, cond), mu, logvar

    # -- K models at once ----------------------------------------------------------------------
    def forward_stacked(self, params: Mapping[str, Tensor], x: Tensor, cond: Tensor | None,
                        eps: Tensor, *, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        # ``gen``: the step's generator, for architectures with dropout (models/published.py); none here
        c = self._c(cond)
        mu, logvar = gaussian_params(stacked_sequential(self.encoder, "encoder", params, _cat(x, c)))
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode_stacked(params, z, c), mu, logvar

    def decode_stacked(self, params: Mapping[str, Tensor], z: Tensor, cond: Tensor | None) -> Tensor:
        c = self._c(cond)
        pairs = _film_pairs(stacked_sequential(self.modulation, "modulation", params, c)) if self.film else ()
        return stacked_sequential(self.decoder, "decoder", params, _cat(z, c), pairs)

    def prior_stacked(self, params: Mapping[str, Tensor], cond: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of the learned conditional prior p(z | c) (``conditional_prior``)."""
        return gaussian_params(stacked_sequential(self.prior, "prior", params, cond))

    def sample_stacked(self, params: Mapping[str, Tensor], z: Tensor, cond: Tensor | None,
                       noise: Tensor | None) -> Tensor:
        """Samples of p(x | z): the decoder mean, plus ``noise`` ([K, n, feature_dim] standard
        normal) scaled by the learned sigma when the model has an output variance. ``z`` is
        standard normal noise; with a conditional prior it is moved to p(z | c) first."""
        if self.conditional_prior:
            mean_z, logvar_z = self.prior_stacked(params, cond)
            z = mean_z + torch.exp(0.5 * logvar_z) * z
        mean = self.decode_stacked(params, z, cond)
        if not self.output_variance:
            return mean
        return mean + torch.exp(0.5 * output_log_var(params[OUTPUT_LOG_VAR])).unsqueeze(1) * noise


class VAE(_VAEBase):
    """Unconditional VAE: one per key; sampling a class decodes prior noise with that class's key."""

    conditional = False

    def __init__(self, feature_dim: int, latent_dim: int, hidden_dim: int, output_variance: bool = False,
                 gen: torch.Generator | None = None):
        super().__init__(feature_dim, latent_dim, hidden_dim, 0, gen, output_variance)


class CVAE(_VAEBase):
    """VAE whose encoder and decoder both see the class condition vector."""

    conditional = True

    def __init__(self, feature_dim: int, condition_dim: int, latent_dim: int, hidden_dim: int,
                 output_variance: bool = False, conditional_prior: bool = False, film: bool = False,
                 gen: torch.Generator | None = None):
        super().__init__(feature_dim, latent_dim, hidden_dim, condition_dim, gen, output_variance, conditional_prior,
                         film)


class GANGenerator(Architecture):
    """G(z, cond) -> feature vector."""

    conditional = True

    def __init__(self, feature_dim: int, condition_dim: int, latent_dim: int, hidden_dim: int,
                 gen: torch.Generator | None = None, film: bool = False):
        super().__init__()
        self.feature_dim, self.condition_dim = feature_dim, condition_dim
        self.latent_dim, self.hidden_dim, self.film = latent_dim, hidden_dim, bool(film)
        d, c, z, h = feature_dim, condition_dim, latent_dim, hidden_dim
        self.net = nn.Sequential(linear(z + c, h), nn.LeakyReLU(0.2), linear(h, h), nn.LeakyReLU(0.2), linear(h, d))
        if self.film:  # after the net: its init draws stay the same
            self.modulation = nn.Sequential(linear(c, 2 * h * FILM_LAYERS))
        init_parameters(self, gen or _default_gen())

    @torch.no_grad()
    def init_from(self, gen: torch.Generator) -> None:
        """The Linear layers as ``init_parameters`` draws them; the modulation starts as none (zero)."""
        init_linears(self, gen)
        _zero_layers(self, "modulation")

    def forward(self, z: Tensor, cond: Tensor) -> Tensor:
        if not self.film:
            return self.net(torch.cat([z, cond], dim=-1))
        return _modulated(self.net, torch.cat([z, cond], dim=-1), _film_pairs(self.modulation(cond)))

    def forward_stacked(self, params: Mapping[str, Tensor], z: Tensor, cond: Tensor, *,
                        gen: torch.Generator | None = None) -> Tensor:
        pairs = _film_pairs(stacked_sequential(self.modulation, "modulation", params, cond)) if self.film else ()
        return stacked_sequential(self.net, "net", params, torch.cat([z, cond], dim=-1), pairs)

    decode_stacked = forward_stacked  # sampling: the generator maps prior noise to features


class GANDiscriminator(Architecture):
    """D(x, cond) -> real/fake logit per sample."""

    def __init__(self, feature_dim: int, condition_dim: int, hidden_dim: int, gen: torch.Generator | None = None):
        super().__init__()
        self.feature_dim, self.condition_dim, self.hidden_dim = feature_dim, condition_dim, hidden_dim
        d, c, h = feature_dim, condition_dim, hidden_dim
        self.net = nn.Sequential(linear(d + c, h), nn.LeakyReLU(0.2), linear(h, h), nn.LeakyReLU(0.2), linear(h, 1))
        init_parameters(self, gen or _default_gen())

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.net(torch.cat([x, cond], dim=-1)).squeeze(-1)

    def forward_stacked(self, params: Mapping[str, Tensor], x: Tensor, cond: Tensor, *,
                        gen: torch.Generator | None = None) -> Tensor:
        return stacked_sequential(self.net, "net", params, torch.cat([x, cond], dim=-1)).squeeze(-1)


class ProjectionDiscriminator(Architecture):
    """D(x, c) = psi(phi(x)) + <embed(c), phi(x)>: a projection discriminator (Miyato & Koyama, 2018).

    The condition enters as an inner product with the features phi(x) instead of being
    concatenated to the input, so D must judge "is x a real sample *of this class*" rather than
    only "is x real": the conditional part of the density ratio is modelled explicitly, which
    keeps a conditional generator from collapsing onto the easiest classes. The condition is the
    class's embedding vector (a linear map of it plays the role of the class embedding table).
    """

    def __init__(self, feature_dim: int, condition_dim: int, hidden_dim: int, gen: torch.Generator | None = None):
        super().__init__()
        self.feature_dim, self.condition_dim, self.hidden_dim = feature_dim, condition_dim, hidden_dim
        d, c, h = feature_dim, condition_dim, hidden_dim
        self.net = nn.Sequential(linear(d, h), nn.LeakyReLU(0.2), linear(h, h), nn.LeakyReLU(0.2))
        self.out = nn.Sequential(linear(h, 1))
        self.embed = nn.Sequential(linear(c, h))
        init_parameters(self, gen or _default_gen())

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        phi = self.net(x)
        return self.out(phi).squeeze(-1) + (self.embed(cond) * phi).sum(-1)

    def forward_stacked(self, params: Mapping[str, Tensor], x: Tensor, cond: Tensor, *,
                        gen: torch.Generator | None = None) -> Tensor:
        phi = stacked_sequential(self.net, "net", params, x)
        proj = (stacked_sequential(self.embed, "embed", params, cond) * phi).sum(-1)
        return stacked_sequential(self.out, "out", params, phi).squeeze(-1) + proj


ARCHITECTURES: dict[str, type[Architecture]] = {
    cls.__name__: cls for cls in (VAE, CVAE, GANGenerator, GANDiscriminator, ProjectionDiscriminator)
}


def build_model(class_name: str, kwargs: Mapping[str, Any], gen: torch.Generator | None = None) -> nn.Module:
    """Rebuild an architecture from its recorded class name and constructor arguments."""
    cls = ARCHITECTURES.get(class_name)
    if cls is None:
        raise CheckpointError(
            f"unknown generator architecture '{class_name}'; known: {', '.join(ARCHITECTURES)}"
        )
    try:
        return cls(**dict(kwargs), gen=gen)
    except TypeError as e:
        raise CheckpointError(f"architecture '{class_name}' cannot be built from {dict(kwargs)}: {e}") from None

"""The published FedA2V generator architectures (``generator.arch=fedgfe``), for migrated runs.

Same layer layout, parameter names, activations, dropout, clamps and final Tanh as the published
``VAEGenerator``, ``ConditionedVAEGenerator``, ``MultiModalVAEGenerator``, ``GANGenerator`` and
``GANDiscriminator`` (lucapalazzo/fedgfe, ``flcore/trainmodel/generators.py``), written here from
their description, so a migrated state dict loads by name and computes the published function:
in eval mode, for finite inputs, the same inputs and noise give the same outputs bit for bit.
Differences that are not part of the function: features are flat vectors (the published
``[seq, dim]`` views are reshapes of them), the noise is passed in (``eps``/``z``) instead of drawn
inside, the class condition arrives per sample (the published code repeats one per batch), and the
NaN/Inf fallbacks (which only act on non-finite values) are left out.

The ``*_stacked`` methods evaluate K keys at once for the store's grouped step. Their Linear and
LayerNorm layers run key by key with the same kernels as ``forward`` (not one batched matmul), so
the grouped step computes what each published module computes; dropout is active only when the
caller passes the step's ``gen`` (masks drawn from it, so a resumed run draws the same masks).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feda2v.models.generators import ARCHITECTURES, Architecture
from feda2v.models.init import init_parameters, linear


def _default_gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _per_key_linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """x [K, n, in], w [K, out, in], b [K, out] -> [K, n, out] with F.linear per key."""
    return torch.stack([F.linear(x[k], w[k], b[k]) for k in range(w.shape[0])])


def _per_key_layer_norm(x: Tensor, layer: nn.LayerNorm, w: Tensor, b: Tensor) -> Tensor:
    return torch.stack([F.layer_norm(x[k], layer.normalized_shape, w[k], b[k], layer.eps) for k in range(w.shape[0])])


def _dropout(x: Tensor, p: float, gen: torch.Generator) -> Tensor:
    keep = torch.rand(x.shape, generator=gen, device=gen.device).to(x.device) >= p
    return x * keep / (1.0 - p)


def _run(seq: nn.Sequential, prefix: str, params: Mapping[str, Tensor], x: Tensor,
         gen: torch.Generator | None) -> Tensor:
    """``seq``'s layers over [K, n, ...] with stacked parameters ``params[f"{prefix}.{i}.weight"]``."""
    for i, layer in enumerate(seq):
        if isinstance(layer, nn.Linear):
            x = _per_key_linear(x, params[f"{prefix}.{i}.weight"], params[f"{prefix}.{i}.bias"])
        elif isinstance(layer, nn.LayerNorm):
            x = _per_key_layer_norm(x, layer, params[f"{prefix}.{i}.weight"], params[f"{prefix}.{i}.bias"])
        elif isinstance(layer, nn.Dropout):
            if gen is not None and layer.p > 0:
                x = _dropout(x, layer.p, gen)
        else:
            x = layer(x)
    return x


def _mlp(dims: list[int], act: Callable[[], nn.Module], dropout: float | None, final: nn.Module | None = None,
         act_after_last: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(linear(a, b))
        last = i == len(dims) - 2
        if not last or act_after_last:
            layers.append(act())
            if dropout is not None:
                layers.append(nn.Dropout(dropout))
    if final is not None:
        layers.append(final)
    return nn.Sequential(*layers)


class _Base(Architecture):
    conditional = False


class FedgfeVAE(_Base):
    """Published ``VAEGenerator``: ReLU + Dropout(0.2) MLPs; reparametrisation clamps mu, logvar, z."""

    def __init__(self, feature_dim: int, latent_dim: int, hidden_dim: int, gen: torch.Generator | None = None):
        super().__init__()
        self.feature_dim, self.latent_dim, self.hidden_dim = feature_dim, latent_dim, hidden_dim
        d, z, h = feature_dim, latent_dim, hidden_dim
        self.encoder = _mlp([d, h, h, 2 * z], nn.ReLU, 0.2)
        self.decoder = _mlp([z, h, h, d], nn.ReLU, 0.2)
        init_parameters(self, gen or _default_gen())

    @torch.no_grad()
    def init_from(self, gen: torch.Generator) -> None:
        """The published initialisation (its ``_initialize_weights``): Xavier-normal weights with
        gain 0.1, zero biases; drawn from ``gen`` (construction and resets alike)."""
        for sub in self.modules():
            if isinstance(sub, nn.Linear):
                std = 0.1 * math.sqrt(2.0 / (sub.in_features + sub.out_features))
                draw = torch.empty(sub.weight.shape, dtype=sub.weight.dtype, device=gen.device)
                sub.weight.copy_(draw.normal_(0.0, std, generator=gen))
                sub.bias.zero_()


    @staticmethod
    def _latent(q: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = q.chunk(2, dim=-1)
        # the published reparameterize: clamp logvar to [-5, 2], mu to [-5, 5], then z to [-5, 5]
        std = torch.exp(0.5 * torch.clamp(logvar, min=-5, max=2))
        z = torch.clamp(torch.clamp(mu, min=-5, max=5) + eps * std, min=-5, max=5)
        return z, mu, logvar

    def forward(self, x: Tensor, cond: Tensor | None = None, *, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z, mu, logvar = self._latent(self.encoder(x), eps)
        return self.decoder(z), mu, logvar

    def forward_stacked(self, params: Mapping[str, Tensor], x: Tensor, cond: Tensor | None, eps: Tensor, *,
                        gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        z, mu, logvar = self._latent(_run(self.encoder, "encoder", params, x, gen), eps)
        return _run(self.decoder, "decoder", params, z, gen), mu, logvar

    def decode_stacked(self, params: Mapping[str, Tensor], z: Tensor, cond: Tensor | None) -> Tensor:
        return _run(self.decoder, "decoder", params, z, None)


class FedgfeCVAE(_Base):
    """Published ``ConditionedVAEGenerator``: LeakyReLU(0.2) MLPs, separate fc_mu/fc_logvar, final Tanh."""

    conditional = True

    def __init__(self, feature_dim: int, condition_dim: int, latent_dim: int, hidden_dim: int,
                 gen: torch.Generator | None = None):
        super().__init__()
        self.feature_dim, self.condition_dim = feature_dim, condition_dim
        self.latent_dim, self.hidden_dim = latent_dim, hidden_dim
        d, c, z, h = feature_dim, condition_dim, latent_dim, hidden_dim
        self.encoder = _mlp([d + c, h, h], lambda: nn.LeakyReLU(0.2), None, act_after_last=True)
        self.fc_mu = linear(h, z)
        self.fc_logvar = linear(h, z)
        self.decoder = _mlp([z + c, h, h, d], lambda: nn.LeakyReLU(0.2), None, final=nn.Tanh())
        init_parameters(self, gen or _default_gen())


    # the condition as the encoder and decoder see it (the multimodal VAE projects it first)
    def _condition_one(self, cond: Tensor) -> Tensor:
        return cond

    def _condition(self, cond: Tensor, params: Mapping[str, Tensor], gen: torch.Generator | None) -> Tensor:
        return cond

    def forward(self, x: Tensor, cond: Tensor, *, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self._condition_one(cond)
        h = self.encoder(torch.cat([x, c], dim=-1))
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decoder(torch.cat([z, c], dim=-1)), mu, logvar

    def forward_stacked(self, params: Mapping[str, Tensor], x: Tensor, cond: Tensor, eps: Tensor, *,
                        gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        c = self._condition(cond, params, gen)
        h = _run(self.encoder, "encoder", params, torch.cat([x, c], dim=-1), gen)
        mu = _per_key_linear(h, params["fc_mu.weight"], params["fc_mu.bias"])
        logvar = _per_key_linear(h, params["fc_logvar.weight"], params["fc_logvar.bias"])
        z = mu + eps * torch.exp(0.5 * logvar)
        return _run(self.decoder, "decoder", params, torch.cat([z, c], dim=-1), gen), mu, logvar

    def decode_stacked(self, params: Mapping[str, Tensor], z: Tensor, cond: Tensor) -> Tensor:
        return _run(self.decoder, "decoder", params, torch.cat([z, self._condition(cond, params, None)], dim=-1), None)


class FedgfeMultiModalVAE(FedgfeCVAE):
    """Published ``MultiModalVAEGenerator`` conditioned on CLIP only (its ``clip_embedding`` path).

    The condition goes through ``clip_projection`` (Linear, LayerNorm, ReLU, Dropout(0.1)) and
    ``single_fusion`` (Linear, LayerNorm, ReLU); encoder and decoder are LeakyReLU(0.2) +
    Dropout(0.2) MLPs with a final Tanh. The published T5 branch (``t5_projection``, ``fusion``)
    takes no part in that function and is not part of this architecture (migration says so).
    """

    def __init__(self, feature_dim: int, condition_dim: int, latent_dim: int, hidden_dim: int, fusion_dim: int,
                 gen: torch.Generator | None = None):
        nn.Module.__init__(self)
        self.feature_dim, self.condition_dim = feature_dim, condition_dim
        self.latent_dim, self.hidden_dim, self.fusion_dim = latent_dim, hidden_dim, fusion_dim
        d, c, z, h, f = feature_dim, condition_dim, latent_dim, hidden_dim, fusion_dim
        self.clip_projection = nn.Sequential(linear(c, f), nn.LayerNorm(f), nn.ReLU(), nn.Dropout(0.1))
        self.single_fusion = nn.Sequential(linear(f, f), nn.LayerNorm(f), nn.ReLU())
        self.encoder = _mlp([d + f, h, h], lambda: nn.LeakyReLU(0.2), 0.2, act_after_last=True)
        self.fc_mu = linear(h, z)
        self.fc_logvar = linear(h, z)
        self.decoder = _mlp([z + f, h, h, d], lambda: nn.LeakyReLU(0.2), 0.2, final=nn.Tanh())
        init_parameters(self, gen or _default_gen())


    def _condition_one(self, cond: Tensor) -> Tensor:
        return _each_distinct_row(cond, lambda row: self.single_fusion(self.clip_projection(row)))

    def _condition(self, cond: Tensor, params: Mapping[str, Tensor], gen: torch.Generator | None) -> Tensor:
        def project(k: int, row: Tensor) -> Tensor:
            one = {n: t[k:k + 1] for n, t in params.items()}
            x = _run(self.clip_projection, "clip_projection", one, row.unsqueeze(0), gen)
            return _run(self.single_fusion, "single_fusion", one, x, gen)[0]

        return torch.stack([_each_distinct_row(cond[k], lambda row, k=k: project(k, row)) for k in range(cond.shape[0])])


def _each_distinct_row(c: Tensor, fn) -> Tensor:
    """``fn`` applied to each distinct row of ``c`` [n, dim] as a batch of one, gathered back.

    The published multimodal VAE projects its (one) condition as a batch of one and repeats it;
    a matmul over one row may round differently from the same row inside a larger batch, so the
    class conditions are projected one at a time, as published (and dropout there is one mask per
    condition, as published)."""
    uniq, inverse = torch.unique(c, dim=0, return_inverse=True)
    return torch.cat([fn(uniq[i:i + 1]) for i in range(uniq.shape[0])])[inverse]


class FedgfeGANGenerator(_Base):
    """Published ``GANGenerator``: unconditional ReLU MLP z -> features (the condition is ignored)."""

    conditional = False

    def __init__(self, feature_dim: int, condition_dim: int, latent_dim: int, hidden_dim: int,
                 gen: torch.Generator | None = None):
        super().__init__()
        self.feature_dim, self.condition_dim = feature_dim, condition_dim
        self.latent_dim, self.hidden_dim = latent_dim, hidden_dim
        self.model = _mlp([latent_dim, hidden_dim, hidden_dim, feature_dim], nn.ReLU, None)
        init_parameters(self, gen or _default_gen())


    def forward(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.model(z)

    def forward_stacked(self, params: Mapping[str, Tensor], z: Tensor, cond: Tensor | None, *,
                        gen: torch.Generator | None = None) -> Tensor:
        return _run(self.model, "model", params, z, gen)

    def decode_stacked(self, params: Mapping[str, Tensor], z: Tensor, cond: Tensor | None) -> Tensor:
        return _run(self.model, "model", params, z, None)


class FedgfeGANDiscriminator(_Base):
    """Published ``GANDiscriminator``: LeakyReLU(0.2) + Dropout(0.2) MLP x -> logit (condition ignored)."""

    def __init__(self, feature_dim: int, condition_dim: int, hidden_dim: int, gen: torch.Generator | None = None):
        super().__init__()
        self.feature_dim, self.condition_dim, self.hidden_dim = feature_dim, condition_dim, hidden_dim
        self.model = _mlp([feature_dim, hidden_dim, hidden_dim, 1], lambda: nn.LeakyReLU(0.2), 0.2)
        init_parameters(self, gen or _default_gen())


    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.model(x).squeeze(-1)

    def forward_stacked(self, params: Mapping[str, Tensor], x: Tensor, cond: Tensor | None, *,
                        gen: torch.Generator | None = None) -> Tensor:
        return _run(self.model, "model", params, x, gen).squeeze(-1)


PUBLISHED_ARCHITECTURES: dict[str, type[Architecture]] = {
    cls.__name__: cls for cls in (FedgfeVAE, FedgfeCVAE, FedgfeMultiModalVAE, FedgfeGANGenerator,
                                  FedgfeGANDiscriminator)
}
# build_model and the kinds table find architectures by class name (models/__init__ imports this)
ARCHITECTURES.update(PUBLISHED_ARCHITECTURES)

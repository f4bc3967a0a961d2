"""models/: architectures, stacked (keyed) evaluation, seeded init, losses."""
from __future__ import annotations

import pytest
import torch

from feda2v.errors import CheckpointError
from feda2v.models import (
    CVAE,
    VAE,
    Classifier,
    GANDiscriminator,
    GANGenerator,
    beta_schedule,
    build_model,
    init_parameters,
    vae_kl_per_sample,
)

D, C, Z, H = 6, 4, 3, 8


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_parameter_names_are_plain_and_stable():
    assert [n for n, _ in CVAE(D, C, Z, H).named_parameters()] == [
        f"{part}.{i}.{w}" for part in ("encoder", "decoder") for i in (0, 2, 4) for w in ("weight", "bias")
    ]
    assert [n for n, _ in GANGenerator(D, C, Z, H).named_parameters()] == [
        f"net.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")
    ]
    assert CVAE(D, C, Z, H).encoder[0].weight.shape == (H, D + C)
    assert VAE(D, Z, H).encoder[0].weight.shape == (H, D)
    assert VAE(D, Z, H).encoder[4].weight.shape == (2 * Z, H)  # [mu, logvar]


def test_forward_shapes():
    x, c, z = torch.randn(5, D), torch.randn(5, C), torch.randn(5, Z)
    recon, mu, logvar = CVAE(D, C, Z, H)(x, c, eps=z)
    assert recon.shape == (5, D) and mu.shape == (5, Z) and logvar.shape == (5, Z)
    assert VAE(D, Z, H)(x, eps=z)[0].shape == (5, D)
    assert GANGenerator(D, C, Z, H)(z, c).shape == (5, D)
    assert GANDiscriminator(D, C, H)(x, c).shape == (5,)
    assert Classifier(D, 7, H)(x).shape == (5, 7)


def test_cvae_needs_condition():
    with pytest.raises(ValueError):
        CVAE(D, C, Z, H).decode(torch.randn(2, Z))


def _cvae_film(g: torch.Generator) -> CVAE:
    m = CVAE(D, C, Z, H, film=True, gen=g)
    with torch.no_grad():  # a trained modulation (it starts at zero, where it changes nothing)
        for p in m.modulation.parameters():
            p.normal_(0, 0.5, generator=g)
    return m


def _gen_film(g: torch.Generator) -> GANGenerator:
    m = GANGenerator(D, C, Z, H, film=True, gen=g)
    with torch.no_grad():
        for p in m.modulation.parameters():
            p.normal_(0, 0.5, generator=g)
    return m


@pytest.mark.parametrize("kind", ["vae", "cvae", "cvae_film", "gen", "gen_film", "disc"])
def test_stacked_forward_equals_each_module_forward(kind):
    k, n = 3, 5
    make = {"vae": lambda g: VAE(D, Z, H, gen=g), "cvae": lambda g: CVAE(D, C, Z, H, gen=g), "cvae_film": _cvae_film,
            "gen": lambda g: GANGenerator(D, C, Z, H, gen=g), "gen_film": _gen_film, "disc": lambda g: GANDiscriminator(D, C, H, gen=g)}[kind]
    mods = [make(_gen(i)) for i in range(k)]
    stacked = {name: torch.stack([dict(m.named_parameters())[name] for m in mods]) for name, _ in mods[0].named_parameters()}
    g = _gen(99)
    x, c, z = torch.randn(k, n, D, generator=g), torch.randn(k, n, C, generator=g), torch.randn(k, n, Z, generator=g)
    with torch.no_grad():
        if kind in ("vae", "cvae", "cvae_film"):
            out = mods[0].forward_stacked(stacked, x, c, z)
            for i, m in enumerate(mods):
                ref = m(x[i], c[i], eps=z[i])
                for a, b in zip(out, ref):
                    torch.testing.assert_close(a[i], b, rtol=1e-5, atol=1e-6)
            dec = mods[0].decode_stacked(stacked, z, c)
            for i, m in enumerate(mods):
                torch.testing.assert_close(dec[i], m.decode(z[i], c[i]), rtol=1e-5, atol=1e-6)
        elif kind in ("gen", "gen_film"):
            out = mods[0].forward_stacked(stacked, z, c)
            for i, m in enumerate(mods):
                torch.testing.assert_close(out[i], m(z[i], c[i]), rtol=1e-5, atol=1e-6)
        else:
            out = mods[0].forward_stacked(stacked, x, c)
            assert out.shape == (k, n)
            for i, m in enumerate(mods):
                torch.testing.assert_close(out[i], m(x[i], c[i]), rtol=1e-5, atol=1e-6)


def test_seeded_init_is_deterministic_in_place_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b, other = CVAE(D, C, Z, H, gen=_gen(1)), CVAE(D, C, Z, H, gen=_gen(1)), CVAE(D, C, Z, H, gen=_gen(2))
    assert torch.equal(before, torch.random.get_rng_state())
    for (n, pa), (_, pb), (_, po) in zip(a.named_parameters(), b.named_parameters(), other.named_parameters()):
        assert torch.equal(pa, pb), n
        assert not torch.equal(pa, po), n
    ids = [id(p) for p in a.parameters()]
    old = [p.detach().clone() for p in a.parameters()]
    init_parameters(a, _gen(3))
    assert ids == [id(p) for p in a.parameters()]
    assert all(not torch.equal(o, p) for o, p in zip(old, a.parameters()))
    bound = 1 / (D + C) ** 0.5
    assert a.encoder[0].weight.abs().max() <= bound


def test_beta_schedule_warms_up_on_step_and_caps():
    steps = torch.tensor([0.0, 50.0, 100.0, 400.0])
    torch.testing.assert_close(beta_schedule(steps, 2.0, 100), torch.tensor([0.0, 1.0, 2.0, 2.0]))
    torch.testing.assert_close(beta_schedule(steps, 0.5, 0), torch.full((4,), 0.5))


def test_kl_is_zero_at_prior_and_positive_elsewhere():
    assert torch.equal(vae_kl_per_sample(torch.zeros(2, Z), torch.zeros(2, Z)), torch.zeros(2))
    assert (vae_kl_per_sample(torch.ones(2, Z), torch.zeros(2, Z)) > 0).all()


def test_build_model_round_trips_kwargs_and_rejects_unknown():
    m = CVAE(D, C, Z, H)
    assert isinstance(build_model("CVAE", m.kwargs()), CVAE)
    with pytest.raises(CheckpointError, match="Transformer"):
        build_model("Transformer", {})
    with pytest.raises(CheckpointError, match="CVAE"):
        build_model("CVAE", {"feature_dim": 3})


def test_stacked_linear_gradients_are_exact_and_laid_out_like_parameters():
    from feda2v.models.functional import stacked_linear

    g = _gen(4)
    x = torch.randn(3, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(stacked_linear, (x, w, b))
    gw = torch.autograd.grad(stacked_linear(x, w, b).sum(), [w])[0]
    assert gw.is_contiguous()  # the fused optimizer reads gradients linearly


@pytest.mark.parametrize("shape", [(1, 64, 400, 128), (10, 7, 128, 128), (500, 8, 384, 1)])
def test_a_layer_without_weight_gradients_gives_the_custom_backwards_input_gradient_bit_for_bit(shape):
    """stacked_linear with constant weights (the G step's D, sampling) runs autograd's own baddbmm:
    the same forward and the same input gradient, to the bit, as the custom function it skips."""
    from feda2v.models.functional import _StackedLinear, stacked_linear

    k, n, i, o = shape
    g = _gen(5)
    x = torch.randn(k, n, i, generator=g, requires_grad=True)
    w, b = torch.randn(k, o, i, generator=g), torch.randn(k, o, generator=g)
    up = torch.randn(k, n, o, generator=g)
    y_native, y_custom = stacked_linear(x, w, b), _StackedLinear.apply(x, w, b, None, None)
    assert type(y_native.grad_fn).__name__ == "BaddbmmBackward0"  # no Python node in the backward
    assert torch.equal(y_native, y_custom)
    (gx_native,), (gx_custom,) = torch.autograd.grad(y_native, [x], up), torch.autograd.grad(y_custom, [x], up)
    assert torch.equal(gx_native, gx_custom)


def test_output_variance_is_an_extra_parameter_with_the_same_linear_draws():
    plain, with_var = CVAE(D, C, Z, H, gen=_gen(4)), CVAE(D, C, Z, H, output_variance=True, gen=_gen(4))
    names = [n for n, _ in with_var.named_parameters()]
    assert names == ["output_scaled_log_var"] + [n for n, _ in plain.named_parameters()]
    for n, p in plain.named_parameters():  # the variance draws nothing: the layers are as before
        assert torch.equal(p, dict(with_var.named_parameters())[n]), n
    assert torch.equal(with_var.output_scaled_log_var, torch.zeros(D))  # sigma^2 = 1 at the start
    assert "output_variance" not in plain.kwargs()  # recorded as before it existed
    assert with_var.kwargs()["output_variance"] is True
    assert build_model("CVAE", with_var.kwargs()).output_variance


# Layers added after checkpoints existed: each is drawn after the others (so the rest of the model
# is as before), starts as "nothing yet" (zero), and is recorded in kwargs only when on.
ADDED_LAYERS = [(CVAE, "conditional_prior", "prior"), (CVAE, "film", "modulation"),
                (GANGenerator, "film", "modulation")]


@pytest.mark.parametrize("cls,key,layer", ADDED_LAYERS, ids=[f"{c.__name__}-{k}" for c, k, _ in ADDED_LAYERS])
def test_an_added_layer_is_drawn_last_starts_at_zero_and_is_recorded_only_when_on(cls, key, layer):
    plain, added = cls(D, C, Z, H, gen=_gen(4)), cls(D, C, Z, H, **{key: True}, gen=_gen(4))
    names = [n for n, _ in added.named_parameters()]
    assert names == [n for n, _ in plain.named_parameters()] + [f"{layer}.0.weight", f"{layer}.0.bias"]
    for n, p in plain.named_parameters():
        assert torch.equal(p, dict(added.named_parameters())[n]), n
    assert all(not p.any() for p in getattr(added, layer).parameters())
    assert key not in plain.kwargs()  # recorded as before it existed
    assert added.kwargs()[key] is True
    assert getattr(build_model(cls.__name__, added.kwargs()), key)


def test_conditional_prior_starts_at_n01():
    with_prior = CVAE(D, C, Z, H, conditional_prior=True, gen=_gen(4))
    mean, logvar = with_prior.prior(torch.randn(3, C, generator=_gen(5))).chunk(2, dim=-1)
    assert torch.equal(mean, torch.zeros(3, Z)) and torch.equal(logvar, torch.zeros(3, Z))  # N(0, I)


def test_film_modulates_the_decoders_hidden_layers_starting_at_none():
    plain, film = CVAE(D, C, Z, H, gen=_gen(4)), CVAE(D, C, Z, H, film=True, gen=_gen(4))
    assert film.modulation[0].weight.shape == (2 * H * 2, C)  # [scale, shift] for each of the 2 hidden layers
    z, c = torch.randn(5, Z, generator=_gen(5)), torch.randn(5, C, generator=_gen(6))
    assert torch.equal(film.decode(z, c), plain.decode(z, c))  # zero modulation: the plain decoder
    with torch.no_grad():  # a scale of -1 on the first hidden layer zeroes it: what remains is the
        film.modulation[0].bias[:H] = -1.0  # SiLU(0) = 0 input to layer 2, so the output is c-free there
        h2 = torch.nn.functional.silu(film.decoder[2].bias.expand(5, H))
        torch.testing.assert_close(film.decode(z, c), film.decoder[4](h2))


def test_gan_generator_film_starts_at_none():
    plain, film = GANGenerator(D, C, Z, H, gen=_gen(4)), GANGenerator(D, C, Z, H, film=True, gen=_gen(4))
    z, c = torch.randn(5, Z, generator=_gen(5)), torch.randn(5, C, generator=_gen(6))
    assert torch.equal(film(z, c), plain(z, c))


def test_kl_to_the_conditional_prior_is_the_gaussian_kl():
    from torch.distributions import Normal, kl_divergence

    from feda2v.models.losses import vae_kl_per_sample, vae_kl_to_prior_per_sample

    g = _gen(6)
    mu, lv, pm, plv = (torch.randn(5, Z, dtype=torch.float64, generator=g) for _ in range(4))
    want = kl_divergence(Normal(mu, (0.5 * lv).exp()), Normal(pm, (0.5 * plv).exp())).sum(-1)
    torch.testing.assert_close(vae_kl_to_prior_per_sample(mu, lv, pm, plv), want)
    zero = torch.zeros_like(mu)  # at the N(0, I) prior it is the usual KL
    torch.testing.assert_close(vae_kl_to_prior_per_sample(mu, lv, zero, zero), vae_kl_per_sample(mu, lv))


def test_output_nll_fits_the_variance_to_the_residual_and_trains_nothing_else():
    from feda2v.models.losses import output_nll_per_sample

    g = _gen(8)
    x = torch.randn(400, D, generator=g) * torch.linspace(0.2, 2.0, D)  # per-feature residual scales
    recon = torch.zeros(400, D, requires_grad=True)
    r2 = x.pow(2).mean(0)
    log_var = r2.log().requires_grad_(True)  # the minimiser: the per-feature mean squared residual
    gv, gr = torch.autograd.grad(output_nll_per_sample(recon, x, log_var).mean(), [log_var, recon],
                                 allow_unused=True)
    torch.testing.assert_close(gv, torch.zeros(D), atol=1e-6, rtol=0)
    assert gr is None  # the residual is detached: the decoder's training is unchanged
    off = (r2.log() + 0.5).requires_grad_(True)  # too large a variance: the gradient lowers it
    (g_off,) = torch.autograd.grad(output_nll_per_sample(recon, x, off).mean(), off)
    assert (g_off > 0).all()


def test_log_variances_are_bounded_with_the_identity_inside_and_a_gradient_back_from_outside():
    from feda2v.models.generators import LOGVAR_BOUNDS, gaussian_params

    lo, hi = LOGVAR_BOUNDS
    raw = torch.tensor([[0.5, -1.0, lo + 0.5, hi - 0.5, hi + 40.0, lo - 40.0]], requires_grad=True)
    out = torch.cat([torch.zeros(1, 6), raw], 1)  # [mean, logvar] side by side
    mean, logvar = gaussian_params(out)
    assert torch.equal(logvar[0, :4], raw[0, :4].detach())  # the identity, bit for bit, inside
    assert logvar[0, 4].item() == hi and logvar[0, 5].item() == lo
    (g,) = torch.autograd.grad((logvar * torch.arange(1.0, 7.0)).sum(), raw)
    assert torch.equal(g, torch.arange(1.0, 7.0).unsqueeze(0))  # outside too: a unit left there can come back


@pytest.mark.parametrize("prior", [False, True])
def test_the_posterior_and_prior_log_variances_of_the_vaes_are_bounded(prior):
    from feda2v.models.generators import LOGVAR_BOUNDS

    m = CVAE(D, C, Z, H, conditional_prior=prior, gen=_gen(4))
    with torch.no_grad():  # a posterior (and a prior) whose log-variance ran away
        m.encoder[4].bias[Z:] = 500.0
        if prior:
            m.prior[0].bias[Z:] = -500.0
    x, c = torch.randn(5, D), torch.randn(5, C)
    recon, mu, logvar = m(x, c, eps=torch.randn(5, Z))
    assert torch.isfinite(recon).all() and logvar.max().item() == LOGVAR_BOUNDS[1]
    stacked = {n: p.unsqueeze(0) for n, p in m.named_parameters()}
    _, _, stacked_logvar = m.forward_stacked(stacked, x.unsqueeze(0), c.unsqueeze(0), torch.randn(1, 5, Z))
    assert torch.equal(stacked_logvar[0], logvar)
    if prior:
        assert m.prior_stacked(stacked, c.unsqueeze(0))[1].min().item() == LOGVAR_BOUNDS[0]

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from genfast import pretrained
from genfast.families.vae import VAE, VAEConfig, kl_to_standard_normal, reconstruction_nll, to_pixels


def tiny(**changes) -> VAEConfig:
    return VAEConfig(z_dim=4, conv_channels=4, hidden_channels=8, **changes)


def test_shapes():
    family = VAE()
    for config in (tiny(), tiny(conditional=True, num_classes=10), tiny(image_size=32, channels=3)):
        modules = family.build(config)
        labels = torch.arange(5) % 10 if config.conditional else None
        x = torch.rand(5, config.channels, config.image_size, config.image_size) * 2 - 1
        mu, logvar = modules["encoder"](x, labels)
        assert mu.shape == logvar.shape == (5, 4)
        decoded = modules["decoder"](mu, labels)
        assert decoded.shape == x.shape
        pixels = to_pixels(decoded, config.likelihood)
        assert pixels.min() >= -1 and pixels.max() <= 1


def test_kl_term_matches_the_closed_form():
    mu, logvar = torch.randn(7, 4), torch.randn(7, 4)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(dim=1)
    assert torch.allclose(kl_to_standard_normal(mu, logvar), expected, atol=1e-5)
    assert torch.allclose(kl_to_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


def test_reconstruction_terms():
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    decoded = torch.randn(3, 1, 28, 28)
    bernoulli = reconstruction_nll(decoded, x, tiny())
    expected = F.binary_cross_entropy_with_logits(decoded, (x + 1) / 2, reduction="none").sum(dim=(1, 2, 3))
    assert torch.allclose(bernoulli, expected)
    gaussian = reconstruction_nll(decoded, x, tiny(likelihood="gaussian", sigma=0.5))
    assert torch.allclose(gaussian, ((torch.tanh(decoded) - x) ** 2 / 0.5).sum(dim=(1, 2, 3)))


def test_train_step_reports_the_elbo_it_optimises():
    family, config = VAE(), tiny(beta=0.5)
    torch.manual_seed(0)
    modules = family.build(config)
    opts = family.optimizers(modules, config)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    rec, kl = family.elbo_terms(modules, x, None, torch.Generator().manual_seed(3), config)
    losses = family.train_step(modules, opts, x, None, torch.Generator().manual_seed(3), config)
    assert abs(losses["loss"] - (rec + 0.5 * kl).mean().item()) < 1e-3
    assert abs(losses["kl"] - kl.mean().item()) < 1e-4


def test_a_trained_cvae_follows_its_condition(tmp_path):
    from genfast import checkpoint
    from genfast.train import TrainOptions, train

    options = TrainOptions(out=tmp_path, data="fake", steps=100, progress=False, sample_every=1000,
                           checkpoint_every=50)
    path = train("vae", options, preset="tiny", conditional=True, pairs=["lr=0.01"])
    sampler = pretrained.load(path)
    noise = sampler.noise(2, seed=0)
    # The fake classes differ in brightness: a trained CVAE must make class 9 brighter than class 0.
    dark, bright = sampler(noise, torch.zeros(2, dtype=torch.long)), sampler(noise, torch.full((2,), 9))
    assert bright.mean() > dark.mean() + 0.4
    assert checkpoint.load(path).step == 100


def test_interpolation_walks_from_one_sample_to_the_other(tiny_cgan):
    sampler = pretrained.load(tiny_cgan)
    walk = sampler.interpolate(rows=2, steps=5, seed=4, class_index=2).view(2, 5, *sampler.image_shape)
    ends = sampler(sampler.noise(4, seed=4), torch.full((4,), 2))  # rows' start and end noise, in order
    assert torch.allclose(walk[0, 0], ends[0], atol=1e-5) and torch.allclose(walk[0, -1], ends[1], atol=1e-5)
    assert torch.allclose(walk[1, 0], ends[2], atol=1e-5) and torch.allclose(walk[1, -1], ends[3], atol=1e-5)
    assert not torch.allclose(walk[0, 2], ends[0], atol=1e-3)


def test_reparameterisation_draws_z_with_the_posterior_std():
    family, config = VAE(), tiny()
    seen = {}

    class FixedEncoder(torch.nn.Module):
        def forward(self, images, labels=None):
            n = images.shape[0]
            return torch.full((n, 4), 3.0), torch.full((n, 4), float(torch.log(torch.tensor(4.0))))

    class Recorder(torch.nn.Module):
        def forward(self, z, labels=None):
            seen["z"] = z
            return torch.zeros(z.shape[0], 1, 28, 28)

    modules = {"encoder": FixedEncoder(), "decoder": Recorder()}
    family.elbo_terms(modules, torch.zeros(20000, 1, 28, 28), None, torch.Generator().manual_seed(0), config)
    assert abs(seen["z"].mean().item() - 3.0) < 0.02
    assert abs(seen["z"].std().item() - 2.0) < 0.02  # std = exp(logvar / 2) = 2, not exp(logvar) = 4


def test_slerp_keeps_the_norm_where_a_line_would_shrink_it():
    from genfast.families.base import slerp

    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    middle = slerp(a, b, torch.tensor([0.5]))
    assert torch.allclose(middle.norm(), torch.tensor(3.0))  # a straight line gives 3 / sqrt(2)
    assert torch.allclose(slerp(a, a, torch.tensor([0.3])), a)  # parallel: no division by zero


def test_the_gaussian_likelihood_trains(tmp_path):
    from genfast import checkpoint
    from genfast.train import TrainOptions, train

    path = train("vae", TrainOptions(out=tmp_path, data="fake", steps=30, progress=False, sample_every=1000),
                 preset="tiny", pairs=["likelihood=gaussian"])
    assert checkpoint.load(path).step == 30  # its summed loss starts ~1e4: not taken for a divergence
    images = pretrained.load(path).generate(4, seed=0)
    assert images.min() >= -1 and images.max() <= 1

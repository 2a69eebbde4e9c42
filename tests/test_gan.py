import torch
from torch import nn

from genfast.families.gan import GAN, Discriminator, GANConfig, Generator


def test_generator_is_the_seeds_architecture():
    g = Generator(GANConfig())
    assert g.fc.in_features == 100 and g.fc.out_features == 128 * 7 * 7
    assert isinstance(g.bn0, nn.BatchNorm1d)
    assert (g.up1.in_channels, g.up1.out_channels, g.up1.kernel_size, g.up1.stride) == (128, 64, (4, 4), (2, 2))
    assert (g.up2.in_channels, g.up2.out_channels) == (64, 1)
    out = g.eval()(torch.randn(5, 100) * 10)  # big inputs: the tanh must still bound the output
    assert out.shape == (5, 1, 28, 28)
    assert out.min() >= -1 and out.max() <= 1


def test_discriminator_shapes_and_logits():
    d = Discriminator(GANConfig())
    assert [d.conv1.out_channels, d.conv2.out_channels, d.conv3.out_channels] == [32, 64, 128]
    assert d.out.in_features == 128 * 4 * 4
    logits = d(torch.rand(3, 1, 28, 28) * 2 - 1)
    assert logits.shape == (3,)


def test_other_sizes_and_rgb():
    cfg = GANConfig(image_size=32, channels=3)
    g, d = Generator(cfg), Discriminator(cfg)
    images = g(torch.randn(2, 100))
    assert images.shape == (2, 3, 32, 32)
    assert d(images).shape == (2,)


def test_conditional_output_depends_on_the_label():
    cfg = GANConfig(conditional=True, num_classes=10)
    g = Generator(cfg).eval()
    z = torch.randn(1, 100).repeat(10, 1)
    out = g(z, torch.arange(10))
    assert not torch.allclose(out[0], out[1])
    d = Discriminator(cfg)
    x = torch.rand(1, 1, 28, 28).repeat(2, 1, 1, 1)
    a, b = d.eval()(x, torch.tensor([0, 1]))
    assert a != b  # the one-hot label planes reach the discriminator


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_each_step_updates_only_its_own_network():
    family, cfg = GAN(), GANConfig(z_dim=8, hidden_channels=8, conv_channels=4, disc_channels=4)
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    for frozen, lr in (("discriminator", {"lr_d": 0.0}), ("generator", {"lr_g": 0.0})):
        cfg_step = GANConfig(**{**cfg.__dict__, **lr})
        modules = family.build(cfg_step)
        opts = family.optimizers(modules, cfg_step)
        other = "generator" if frozen == "discriminator" else "discriminator"
        before_frozen, before_other = _params(modules[frozen]), _params(modules[other])
        losses = family.train_step(modules, opts, x, None, torch.Generator().manual_seed(0), cfg_step)
        assert all(torch.equal(a, b) for a, b in zip(before_frozen, _params(modules[frozen])))
        assert any(not torch.equal(a, b) for a, b in zip(before_other, _params(modules[other])))
        assert set(losses) >= {"loss_d", "loss_g"}
        # The generator step leaves the discriminator trainable for the next D step.
        assert all(p.requires_grad for p in modules["discriminator"].parameters())


def test_discriminator_loss_is_the_nonsaturating_bce():
    family, cfg = GAN(), GANConfig(z_dim=8, hidden_channels=8, conv_channels=4, disc_channels=4, lr_d=0.0,
                                   lr_g=0.0)
    torch.manual_seed(0)
    modules = family.build(cfg)
    opts = family.optimizers(modules, cfg)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    losses = family.train_step(modules, opts, x, None, torch.Generator().manual_seed(3), cfg)
    # Recompute with the same noise: D on real and on fake (both in train mode, as in the step).
    z = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        G, D = modules["generator"], modules["discriminator"]
        fake = G(z)
        d_real, d_fake = D(x), D(fake)
    expected_d = -torch.log(torch.sigmoid(d_real)).mean() - torch.log(1 - torch.sigmoid(d_fake)).mean()
    expected_g = -torch.log(torch.sigmoid(d_fake)).mean()
    assert abs(losses["loss_d"] - expected_d.item()) < 1e-4
    assert abs(losses["loss_g"] - expected_g.item()) < 1e-4

"""Every engine against the eager fp32 reference, on the same noise."""

import pytest
import torch
from torch import nn

import genfast
from genfast import engines
from genfast.engines import TOLERANCES
from genfast.engines.compiled import bucket
from genfast.engines.fusion import fold_batchnorm
from genfast.errors import GenfastError

SHIPPED = ["gan-mnist", "cgan-fashion-mnist", "vae-fashion-mnist", "cvae-mnist"]


def reference(name, n=64, seed=3):
    sampler = genfast.load(name)
    noise, labels = sampler.noise(n, seed), sampler.labels(n)
    return sampler, noise, labels, sampler(noise, labels)


@pytest.mark.parametrize("name", SHIPPED)
def test_fused_is_exact_to_fp32_rounding(name):
    sampler, noise, labels, expected = reference(name)
    fused = engines.apply(sampler, "fused")
    assert (fused(noise, labels) - expected).abs().max() < TOLERANCES["fused"].max_abs
    # The folded network really has no BatchNorm left, and the original keeps its own.
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.module.modules())
    if name.startswith(("gan", "cgan")):
        assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in sampler.module.modules())


def test_folding_covers_linear_conv_and_transposed_conv():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8 * 4 * 4), nn.BatchNorm1d(8 * 4 * 4), nn.Unflatten(1, (8, 4, 4)),
                        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6),
                        nn.ConvTranspose2d(6, 3, 4, 2, 1, bias=False), nn.BatchNorm2d(3))

    class Wrapped(nn.Module):  # the sampler calling convention: (noise, labels)
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, z, labels=None):
            return self.net(z)

    module = Wrapped()
    for m in net.modules():  # make the running statistics non-trivial
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    module.eval()
    z = torch.randn(7, 5)
    folded = fold_batchnorm(module, conditional=False)
    assert torch.allclose(folded(z), module(z), atol=1e-5)
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules()) == 0


@pytest.mark.parametrize("name", SHIPPED)
def test_bf16_is_within_its_pixel_error_bound_and_keeps_the_class(name):
    sampler, noise, labels, expected = reference(name, n=200)
    fast = engines.apply(sampler, "bf16")(noise, labels)
    # bf16 keeps 8 bits of mantissa: pixels move by a few hundredths at most, on average far less.
    assert (fast - expected).abs().max() < TOLERANCES["bf16"].max_abs
    assert (fast - expected).abs().mean() < TOLERANCES["bf16"].mean_abs
    if sampler.conditional:
        from genfast import metrics

        judge = metrics.load_judge(sampler.info["dataset"])
        _, predicted_ref = judge.embed([expected], 200, "", progress=False)
        _, predicted_fast = judge.embed([fast], 200, "", progress=False)
        # Agreeing on all but that share of images: the class accuracy cannot fall by more.
        assert (predicted_ref == predicted_fast).float().mean() >= 1 - TOLERANCES["bf16"].accuracy_drop


def judged_labels(sampler, pixels):
    from genfast import metrics

    judge = metrics.load_judge(sampler.info["dataset"])
    return judge.embed([pixels], len(pixels), "", progress=False)[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cgan-mnist", "cvae-mnist", "vae-fashion-mnist"])
def test_int8_is_within_its_pixel_error_bound_and_keeps_class_accuracy(name):
    pytest.importorskip("onnxruntime")
    sampler, noise, labels, expected = reference(name, n=500)
    fast = engines.apply(sampler, "int8")
    assert fast.module is None  # runs in ONNX Runtime
    pixels = fast(noise, labels)
    # int8 moves pixels by ~1% of the range on average (measured 0.009-0.021 on these
    # models; 0.047 on the Fashion-MNIST GAN); a few pixels by much more.
    assert (pixels - expected).abs().mean() < TOLERANCES["int8"].mean_abs
    if sampler.conditional:
        accuracy = (judged_labels(sampler, pixels) == labels).float().mean()
        reference_accuracy = (judged_labels(sampler, expected) == labels).float().mean()
        assert abs(accuracy - reference_accuracy) <= TOLERANCES["int8"].accuracy_drop


@pytest.mark.slow
def test_engines_compose_left_to_right():
    sampler, noise, labels, expected = reference("cgan-mnist", n=16)
    stacked = engines.apply(sampler, "fused+bf16+compile")
    assert stacked.info["engine"] == "fused+bf16+compile"
    out = stacked(noise, labels)
    bound = engines.tolerance("fused+bf16+compile").max_abs  # bf16's, mostly
    assert out.dtype == torch.float32 and 0 < (out - expected).abs().max() < bound  # within it, and really bf16
    with pytest.raises(GenfastError, match="'onnx' must come last in 'onnx\\+fused'"):
        engines.apply(sampler, "onnx+fused")
    with pytest.raises(GenfastError, match="unknown engine 'warp'"):
        engines.apply(sampler, "fused+warp")


def test_engines_that_need_cuda_say_so_in_one_line():
    sampler = genfast.load("gan-mnist")
    for name, needs in (("cudagraph", "cudagraph needs a CUDA device"), ("fp16", "fp16 runs on CUDA only")):
        with pytest.raises(engines.EngineUnavailable, match=needs):
            engines.apply(sampler, name)


def test_graph_replay_keeps_static_buffers_and_hands_out_copies():
    """The CUDA graph bookkeeping on the CPU: a stand-in recorder whose replay re-runs the
    recorded function on the same static buffers into the same output, as a graph does."""
    from genfast.engines.cudagraph import GraphReplay

    sampler, noise, labels, expected = reference("cgan-mnist", n=8)
    recorded = []

    def recorder(run):
        output = run()
        recorded.append(output)
        return (lambda: output.copy_(run())), output

    replay = GraphReplay(sampler.module, recorder=recorder)
    first = replay(noise[:5], labels[:5])
    assert torch.allclose(first, expected[:5], atol=1e-6)
    second = replay(noise[3:8], labels[3:8])  # same bucket (8): the same graph, new inputs
    assert torch.allclose(second, expected[3:8], atol=1e-6)
    assert torch.allclose(first, expected[:5], atol=1e-6)  # the first result did not change under it
    assert sorted(replay.graphs) == [8] and len(recorded) == 1
    replay(noise[:2], labels[:2])
    assert sorted(replay.graphs) == [2, 8] and len(recorded) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudagraph_matches_eager_on_cuda():
    sampler = genfast.load("cgan-mnist", device="cuda")
    noise, labels = sampler.noise(40, 2), sampler.labels(40)
    fast = engines.apply(sampler, "cudagraph")
    for n in (1, 17, 40):
        assert torch.allclose(fast(noise[:n], labels[:n]).cpu(), sampler(noise[:n], labels[:n]).cpu(),
                              atol=TOLERANCES["cudagraph"].max_abs)


@pytest.mark.slow
def test_compile_matches_eager_and_buckets_batch_sizes():
    sampler, noise, labels, expected = reference("cgan-mnist", n=8)
    fast = engines.apply(sampler, "compile")
    for n in (5, 6, 7, 8):  # one bucket: padded to 8
        assert torch.allclose(fast(noise[:n], labels[:n]), expected[:n], atol=TOLERANCES["compile"].max_abs)
    assert fast.fn.buckets == {8}
    assert [bucket(n) for n in (1, 2, 3, 16, 17, 256)] == [1, 2, 4, 16, 32, 256]


def test_engines_keep_the_sampler_interface_and_refuse_unknown_names():
    sampler = genfast.load("cgan-mnist")
    fused = engines.apply(sampler, "fused")
    assert (fused.noise_shape, fused.class_names) == (sampler.noise_shape, sampler.class_names)
    assert fused.info["engine"] == "fused" and fused.info["dataset"] == "mnist"
    assert torch.allclose(fused.generate(12, seed=1, class_index=4), sampler.generate(12, seed=1, class_index=4),
                          atol=1e-5)
    with pytest.raises(GenfastError, match="unknown engine 'turbo'; choose one of: eager, fused"):
        engines.apply(sampler, "turbo")


@pytest.mark.parametrize("kernel,stride,padding,output_padding",
                         [(4, 2, 1, 0), (2, 2, 0, 0), (6, 3, 2, 1), (8, 4, 2, 0)])
def test_subpixel_rewrite_equals_the_transposed_convolution(kernel, stride, padding, output_padding):
    from genfast.engines.subpixel import SubPixelConv, subpixel

    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(5, 3, kernel, stride, padding, output_padding=output_padding)
    rewritten = subpixel(nn.Sequential(layer))
    assert isinstance(rewritten[0], SubPixelConv)
    x = torch.randn(2, 5, 7, 6)
    assert torch.allclose(rewritten(x), layer(x), atol=1e-5)


def test_subpixel_leaves_layers_it_cannot_rewrite():
    from genfast.engines.subpixel import subpixel

    odd = nn.Sequential(nn.ConvTranspose2d(5, 3, 5, 2, 2, output_padding=1), nn.ConvTranspose2d(3, 3, 4, 2, 0))
    assert all(isinstance(m, nn.ConvTranspose2d) for m in subpixel(odd))

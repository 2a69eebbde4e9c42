"""Style transfer (`genfast transfer`) on tiny seeded models: a CVAE of bars whose style
(thickness, brightness) is not their class, which it must keep; token models of the `fake`
data set, which keep the share of tokens --strength says; and the command line end to end,
every bad input one line that writes nothing."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genfast import attributes, checkpoint, data, images, pretrained, transfer
from genfast.families.ar import decoders
from genfast.train import TrainOptions, train

from test_cli import run

# The classes, in the order a folder data set numbers them (sorted); thickness and brightness are each image's style.
BARS = ("cross", "horizontal", "vertical")


def bar(shape: str, thickness: int, brightness: int) -> np.ndarray:
    pixels = np.zeros((28, 28), np.uint8)
    across = slice(14 - thickness // 2, 14 - thickness // 2 + thickness)
    if shape in ("horizontal", "cross"):
        pixels[across, 4:24] = brightness
    if shape in ("vertical", "cross"):
        pixels[4:24, across] = brightness
    return pixels


@pytest.fixture(scope="module")
def bars(tmp_path_factory) -> str:
    """A folder data set of 300 bars (every 10th is test), one subfolder per shape."""
    root, rng = tmp_path_factory.mktemp("bars"), np.random.default_rng(0)
    for shape in BARS:
        (root / shape).mkdir()
        for i in range(100):
            image = bar(shape, int(rng.integers(2, 9)), int(rng.integers(90, 256)))
            Image.fromarray(image).save(root / shape / f"{i:03d}.png")
    return f"folder:{root}"


@pytest.fixture(scope="module")
def tiny_cvae(bars, tmp_path_factory):
    options = TrainOptions(out=tmp_path_factory.mktemp("cvae"), data=bars, steps=200, progress=False,
                           sample_every=1000, checkpoint_every=1000)
    return train("vae", options, preset="tiny", conditional=True, pairs=["lr=0.01"])


@pytest.fixture(scope="module")
def tiny_maskgit(tiny_vqvae, tmp_path_factory):
    options = TrainOptions(out=tmp_path_factory.mktemp("maskgit"), data="fake", steps=30, progress=False,
                           sample_every=1000, checkpoint_every=1000)
    return train("ar", options, preset="tiny", conditional=True,
                 pairs=[f"tokenizer={tiny_vqvae}", "objective=masked", "decode=parallel"])


def split_images(spec: str, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    test = data.load(spec, "test")
    return test.images[:n], test.labels[:n]


def sources_of(pixels: torch.Tensor, labels: torch.Tensor | None = None) -> transfer.Sources:
    names = [f"image{i}" for i in range(len(pixels))]
    return transfer.Sources(pixels, names, names, labels)


# --- the CVAE ------------------------------------------------------------------------------------

def test_the_cvae_output_keeps_the_source_latent(tiny_cvae, bars):
    """Re-encoded under the target class, each output's latent is nearer its own source's
    latent than most other sources' are (a transfer that lost the style, decoding the
    prior's mean say, is at 0.5: no nearer than any other)."""
    model = transfer.load(tiny_cvae)
    pixels, labels = split_images(bars, 30)
    result = model.run(sources_of(pixels), model.targets(["horizontal"]))
    encoder = model.modules["encoder"]
    with torch.no_grad():
        read_as = torch.tensor([BARS.index(c) for c in result.source_classes])
        source_latent, _ = encoder(images.to_float(pixels), read_as)
        output_latent, _ = encoder(result.images[:, 0], torch.full((len(pixels),), BARS.index("horizontal")))
    distances = torch.cdist(output_latent, source_latent)  # output i against every source
    others = ~torch.eye(len(pixels), dtype=torch.bool)
    nearer = ((distances.diagonal()[:, None] < distances) & others).sum(1) / (len(pixels) - 1)
    assert nearer.mean() >= 0.75


def test_the_cvae_reads_each_source_as_the_class_it_explains_best(tiny_cvae, bars):
    model = transfer.load(tiny_cvae)
    pixels, labels = split_images(bars, 30)
    result = model.run(sources_of(pixels), model.targets(["cross"]))
    assert [BARS.index(c) for c in result.source_classes] == labels.tolist()
    wrong = (labels + 1) % 3  # a class given with the sources is used, not read
    assert model.run(sources_of(pixels, wrong), model.targets(["cross"])).source_classes == [BARS[i] for i in wrong]


def test_the_cvae_draws_each_target_in_the_sources_style(tiny_cvae, bars):
    """Horizontal targets are bars across, vertical ones bars down, and each output is as
    thick as its source."""
    model = transfer.load(tiny_cvae)
    pixels, _ = split_images(bars, 30)
    result = model.run(sources_of(pixels), model.targets(["horizontal,2"]))
    assert [t.label for t in result.targets] == ["horizontal", "vertical"]
    across, down = result.images[:, 0], result.images[:, 1]  # profiles: a horizontal bar varies down its rows
    assert (across.mean(3).var(2) > across.mean(2).var(2)).all() and (down.mean(2).var(2) > down.mean(3).var(2)).all()
    source_thickness = attributes.measure(pixels)["thickness"]
    for made in (across, down):
        r = torch.corrcoef(torch.stack([source_thickness, attributes.measure(made)["thickness"]]))[0, 1]
        assert r >= 0.8


# --- the token models ----------------------------------------------------------------------------

@pytest.fixture(params=["causal", "masked", "scales"])
def token_model(request, tiny_ar, tiny_maskgit, tiny_var):
    return transfer.load({"causal": tiny_ar, "masked": tiny_maskgit, "scales": tiny_var[1]}[request.param])


def test_strength_0_is_the_tokenizers_round_trip_of_the_source(token_model):
    pixels = split_images("fake")[0]
    result = token_model.run(sources_of(pixels), token_model.targets(["3"]), strength=0.0, seed=0)
    with torch.no_grad():
        tokens = token_model.tokenizer.encode(images.to_float(pixels))
        assert torch.equal(result.images[:, 0], token_model.tokenizer.decode(tokens))


def test_strength_1_ignores_the_source_and_is_the_models_own_sample(token_model):
    """Two different sources with the same seed: the same image, image 0 of `genfast sample`."""
    pixels = split_images("fake", 2)[0]
    assert not torch.equal(pixels[0], pixels[1])
    made = [token_model.run(sources_of(pixels[i:i + 1]), token_model.targets(["3"]), strength=1.0, seed=7).images
            for i in (0, 1)]
    assert torch.equal(made[0], made[1])
    sample = pretrained.load(token_model.name, cfg=token_model.options.cfg).generate(1, seed=7, class_index=3)
    assert torch.allclose(made[0][:, 0], sample, atol=1e-6)


def _remade(model: transfer.TokenTransfer, strength: float, target: int = 3):
    """The fake split's first 16 grids, and the model's re-generation of them under class `target`."""
    with torch.no_grad():
        tokens = model.tokenizer.encode(images.to_float(split_images("fake")[0]))
        prefix = model.net.prefix(torch.full((len(tokens),), target))
        uniforms = torch.special.ndtr(model.sampler.noise(len(tokens), seed=0))
        return tokens, prefix, model.remake(prefix, tokens, strength, uniforms)


def test_a_masked_model_keeps_the_share_of_the_tokens_it_finds_likeliest(tiny_maskgit):
    """At strength 1 - 25/49, 25 positions of the model's choosing are the source's, exactly;
    the rest is new."""
    model = transfer.load(tiny_maskgit)
    tokens, prefix, made = _remade(model, 1 - 25 / 49)
    same = made == tokens
    kept = model.likely_positions(prefix, tokens, 25)
    assert kept.sum(1).eq(25).all() and same[kept].all()
    assert (~same).any(1).float().mean() >= 0.5  # most grids changed somewhere in the re-made half


@pytest.mark.parametrize("kind", ["causal", "scales"])
def test_a_favouring_model_keeps_more_of_the_source_the_lower_the_strength(kind, tiny_ar, tiny_var):
    model = transfer.load(tiny_ar if kind == "causal" else tiny_var[1])
    kept = [float((made == tokens).double().mean()) for tokens, _, made in
            (_remade(model, strength) for strength in (0.2, 0.5, 0.8, 1.0))]
    assert kept == sorted(kept, reverse=True) and kept[0] > 0.9 and kept[-1] < 0.5, kept


def test_a_next_scale_model_transfers_with_constant_guidance_whatever_its_header_samples_with(tiny_var, tmp_path):
    tuned = pretrained.slim(tiny_var[1], tmp_path / "tuned.safetensors", half=False,
                            pairs=["cfg_schedule=linear", "last_scale_temperature=0"])
    assert pretrained.load(tuned).module.options.cfg_schedule == "linear"
    model, plain = transfer.load(tuned), transfer.load(tiny_var[1])
    assert model.options == plain.options == decoders.Options(cfg=transfer.DEFAULT_CFG)
    assert torch.equal(_remade(model, 0.5)[2], _remade(plain, 0.5)[2])


def test_favoured_kv_is_kv_at_favour_1_and_the_source_at_a_great_one(tiny_ar):
    """Favour 1 draws exactly what kv draws; a favour no probability can resist gives the
    source back; each token drawn, favoured or not, is one the cache predicts after the
    tokens drawn before it (the uncached transformer over the same sequence agrees)."""
    net = pretrained.load_modules(checkpoint.load(tiny_ar))[2]["gpt"].eval()
    network, prefix = decoders.Network(net), net.prefix(torch.tensor([1, 5]))
    uniforms = torch.rand(2, 3, net.sequence_length, generator=torch.Generator().manual_seed(0))
    source = torch.randint(net.vocab_size, (2, net.sequence_length), generator=torch.Generator().manual_seed(1))
    options = decoders.Options()
    with torch.no_grad():
        assert torch.equal(decoders.favoured_kv(network, prefix, source, 1.0, uniforms, options)[0],
                           decoders.kv(network, prefix, uniforms, options)[0])
        assert torch.equal(decoders.favoured_kv(network, prefix, source, 1e30, uniforms, options)[0], source)
        greedy = decoders.Options(temperature=0.0)  # a one-hot: the argmax, unless the source's token is favoured
        tokens, passes = decoders.favoured_kv(network, prefix, source, 2.0, uniforms, greedy)
        for i in range(net.sequence_length):
            best = net(prefix, tokens[:, :i])[:, -1].argmax(-1)
            assert ((tokens[:, i] == best) | (tokens[:, i] == source[:, i])).all()
    assert passes == net.sequence_length


# --- the command line -----------------------------------------------------------------------------

def write_pngs(folder: Path, pixels: torch.Tensor) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"image{i}.png" for i in range(len(pixels))]
    for path, image in zip(paths, pixels):
        Image.fromarray(image[0].numpy()).save(path)
    return paths


def grid_cells(path: Path, rows: int, columns: int) -> np.ndarray:
    """The tiles of a grid genfast drew (2-pixel padding, at 2x), (rows, columns, 28, 28)."""
    grid = np.asarray(Image.open(path))[::2, ::2]
    assert grid.shape == (rows * 30 + 2, columns * 30 + 2)
    return np.stack([[grid[2 + r * 30:30 + r * 30, 2 + c * 30:30 + c * 30] for c in range(columns)]
                     for r in range(rows)])


def test_files_to_a_grid_with_json(tiny_cvae, bars, tmp_path, capsys):
    pixels = split_images(bars, 3)[0]
    files = write_pngs(tmp_path / "in", pixels)
    status, out, err = run(capsys, "transfer", tiny_cvae, *files, "--to", "cross", "--to", "2", "--out",
                           tmp_path / "grid.png", "--json", tmp_path / "made.json")
    assert status == 0, err
    assert "3 sources (first column) x 2 targets" in out
    cells = grid_cells(tmp_path / "grid.png", 3, 3)
    assert np.array_equal(cells[:, 0], pixels[:, 0].numpy())  # the sources, as given
    model = transfer.load(tiny_cvae)
    expected = model.run(sources_of(pixels), model.targets(["0", "2"]))
    assert np.array_equal(cells[:, 1:], images.to_uint8(expected.images)[:, :, 0].numpy())
    listing = json.loads((tmp_path / "made.json").read_text())
    assert [s["source"] for s in listing["sources"]] == [str(f) for f in files]
    assert [t["to"] for t in listing["targets"]] == ["cross", "vertical"] and listing["strength"] is None
    assert [s["read_as"] for s in listing["sources"]] == expected.source_classes
    assert [s["outputs"] for s in listing["sources"]][2] == [{"row": 2, "column": 1}, {"row": 2, "column": 2}]


def test_a_folder_to_a_folder(tiny_ar, tmp_path, capsys):
    pixels = split_images("fake", 4)[0]
    write_pngs(tmp_path / "in", pixels)
    (tmp_path / "in" / "manifest.json").write_text("{}")  # what `genfast sample` leaves beside its PNGs: skipped
    status, out, err = run(capsys, "transfer", tiny_ar, tmp_path / "in", "--to", "class1,class8", "--strength", 0.5,
                           "--seed", 3, "--out", tmp_path / "out")
    assert status == 0, err
    assert "8 images (4 sources x 2 targets at strength 0.5)" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"image{i}-to-class{c}.png" for i in range(4) for c in (1, 8))
    model = transfer.load(tiny_ar)
    expected = model.run(sources_of(pixels), model.targets(["1", "8"]), strength=0.5, seed=3)
    made = np.asarray(Image.open(tmp_path / "out" / "image2-to-class8.png"))
    assert np.array_equal(made, images.to_uint8(expected.images[2:3, 1])[0, 0].numpy())


def test_a_models_own_samples_as_the_sources(tiny_ar, tiny_cgan, tmp_path, capsys):
    status, _, err = run(capsys, "transfer", tiny_ar, "--to", "class5", "-n", 4, "--seed", 2, "--strength", 0.3,
                         "--out", tmp_path / "own.png")
    assert status == 0, err
    sources = grid_cells(tmp_path / "own.png", 4, 2)[:, 0]
    assert np.array_equal(sources, images.to_uint8(pretrained.load(tiny_ar).generate(4, seed=2))[:, 0].numpy())
    # Another model's samples (of the same data set) go through the same way.
    status, out, err = run(capsys, "transfer", tiny_ar, tiny_cgan, "-n", 3, "--to", "0", "--out", tmp_path / "gan.png")
    assert status == 0 and "3 sources" in out, err


@pytest.fixture(scope="module")
def bad_inputs(bars, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    write_pngs(folder / "good", split_images(bars, 2)[0])
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("L", (32, 32)).save(folder / "big.png")
    Image.new("RGB", (28, 28), (200, 30, 30)).save(folder / "red.png")
    (folder / "empty").mkdir()
    return folder


BAD = [  # (case, what follows the model on the command line, what the error says, the grid's name)
    ("unknown class", ["{good}/image0.png", "--to", "diagonal"], "unknown class", "grid.png"),
    ("an unknown class in a list", ["{good}/image0.png", "--to", "vertical,sandal"], "unknown class", "grid.png"),
    ("a class index out of range", ["{good}/image0.png", "--to", "3"], "outside", "grid.png"),
    ("a file that is no image", ["{bad}/notes.txt", "--to", "1"], "cannot read", "grid.png"),
    ("a damaged PNG", ["{bad}/broken.png", "--to", "1"], "cannot read", "grid.png"),
    ("an image of another size", ["{bad}/big.png", "--to", "1"], "32x32", "grid.png"),
    ("a colour image for a grey model", ["{bad}/red.png", "--to", "1"], "colour", "grid.png"),
    ("a folder without images", ["{bad}/empty", "--to", "1"], "no PNG", "grid.png"),
    ("a missing file", ["{bad}/nothing.png", "--to", "1"], "no such file", "grid.png"),
    ("a model of another data set", ["cvae-mnist", "--to", "1"], "trained on folder:", "grid.png"),
    ("-n for image files", ["{good}", "-n", "3", "--to", "1"], "-n", "grid.png"),
    ("--strength for a CVAE", ["{good}", "--strength", "0.5", "--to", "1"], "--strength", "grid.png"),
    ("a grid of another format", ["{good}", "--to", "1"], ".png", "grid.jpg"),
]


@pytest.mark.parametrize("argv, said, name", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_is_one_line_and_writes_nothing(argv, said, name, tiny_cvae, bad_inputs, tmp_path, capsys):
    argv = [a.format(good=bad_inputs / "good", bad=bad_inputs) for a in argv]
    status, stdout, err = run(capsys, "transfer", tiny_cvae, *argv, "--out", tmp_path / "out" / name, "--json",
                              tmp_path / "out" / "made.json")
    assert status == 1 and stdout == ""
    assert err.startswith("genfast: error: ") and err.count("\n") == 1 and said in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, argv, said", [
    ("vae-mnist", ["--to", "1"], "unconditional"),
    ("{tiny_cgan}", ["--to", "1"], "cannot read an image's style"),
    ("{tiny_vqvae}", ["--to", "1"], "cannot read an image's style"),
    ("{tiny_ar}", ["--to", "1", "--strength", "1.5"], "--strength"),
    ("{tiny_ar}", ["--to", "1", "--strength", "nan"], "--strength"),
    ("{tiny_cvae}", ["--to", "1", "--cfg", "2"], "--cfg"),
])
def test_a_model_that_cannot_do_it_is_one_line(model, argv, said, tiny_cvae, tiny_cgan, tiny_vqvae, tiny_ar,
                                               tmp_path, capsys):
    model = model.format(tiny_cvae=tiny_cvae, tiny_cgan=tiny_cgan, tiny_vqvae=tiny_vqvae, tiny_ar=tiny_ar)
    source = write_pngs(tmp_path / "in", split_images("fake", 1)[0])[0]
    status, stdout, err = run(capsys, "transfer", model, source, *argv, "--out", tmp_path / "out" / "g.png")
    assert status == 1 and stdout == ""
    assert err.startswith("genfast: error: ") and err.count("\n") == 1 and said in err, err
    assert not (tmp_path / "out").exists()


def test_an_empty_prompt_for_a_text_model_is_one_line(tiny_text_ar, tmp_path, capsys):
    source = write_pngs(tmp_path / "in", split_images("fake", 1)[0])[0]
    for prompt in ("", "   "):
        status, _, err = run(capsys, "transfer", tiny_text_ar, source, "--to", prompt, "--out",
                             tmp_path / "o" / "g.png")
        assert status == 1 and err.count("\n") == 1 and "empty prompt" in err, err
    assert not (tmp_path / "o").exists()
    status, out, err = run(capsys, "transfer", tiny_text_ar, source, "--to", "a bright one", "--to", "a dark one",
                           "--out", tmp_path / "o" / "g.png")
    assert status == 0 and "1 sources (first column) x 2 targets" in out, err

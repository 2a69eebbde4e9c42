"""The protocols are complete: a family and an engine written here, and nowhere else, go
through the real CLI and API (train, checkpoint, sample, eval, bench, serve); every module
imports on its own; the top-level imports form no cycle."""

from __future__ import annotations

import ast
import copy
import json
import os
import pkgutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import genfast
from genfast import data, engines
from genfast.engines import rewrap
from genfast.families import FAMILIES
from genfast.families.base import Family, Sampler, TrainedConfig

from test_cli import run

# --- a family written here ------------------------------------------------------------------------


@dataclass
class ConstantConfig(TrainedConfig):
    batch_size: int = 16
    lr: float = 0.05


class ConstantImage(nn.Module):
    """One learned image, whatever the noise: the smallest generator there is."""

    def __init__(self, c: ConstantConfig):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(c.channels, c.image_size, c.image_size))

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.logits)[None] + 0.0 * noise.view(-1, 1, 1, 1)  # (B, C, H, W), traceable


class Constant(Family):
    name = "constant"
    config_class = ConstantConfig
    presets = {"default": {}}
    optimizer_keys = ("lr",)
    generative = True

    def model_name(self, config):
        return "constant"

    def build(self, config):
        return {"image": ConstantImage(config)}

    def optimizers(self, modules, config):
        return {"image": torch.optim.SGD(modules["image"].parameters(), lr=config.lr)}

    def train_step(self, modules, optimizers, images, labels, generator, config):
        loss = (modules["image"](torch.zeros(len(images), 1)) - images).pow(2).sum((1, 2, 3)).mean()
        optimizers["image"].zero_grad()
        loss.backward()
        optimizers["image"].step()
        return {"loss": loss.item()}

    def sampler(self, modules, config, class_names):
        return Sampler.from_module(modules["image"], noise_shape=(1,),
                                   image_shape=(config.channels, config.image_size, config.image_size))

    def inference_modules(self):
        return ("image",)


@pytest.fixture
def constant_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, "constant", Constant())


def test_a_family_written_in_a_test_file_works_everywhere(constant_family, tiny_classifier, tmp_path, capsys):
    status, out, err = run(capsys, "train", "constant", "--data", "fake", "--out", tmp_path / "run", "--steps", 30,
                           "-q")
    assert status == 0, err
    model = tmp_path / "run" / "checkpoint.safetensors"
    # Trained towards the mean image of the data set: not the grey it started from.
    learned = genfast.load(model).generate(1)[0]
    fake = data.load("fake", "train").images.float().mean(0) / 127.5 - 1
    assert (learned - fake).abs().mean() < 0.5 * fake.abs().mean()
    status, out, err = run(capsys, "train", "constant", "--out", tmp_path / "run", "--steps", 40, "--resume", "-q")
    assert status == 0, err

    status, out, err = run(capsys, "sample", model, "-n", 6, "--out", tmp_path / "grid.png", "-q")
    assert status == 0 and "wrote a grid of 6 images" in out, err
    grid = np.asarray(Image.open(tmp_path / "grid.png"))[::2, ::2]  # saved at twice the size
    tiles = [grid[2 + 30 * r:30 * (r + 1), 2 + 30 * c:30 * (c + 1)] for r in range(2) for c in range(3)]
    assert all(np.array_equal(tile, tiles[0]) for tile in tiles) and tiles[0].std() > 0  # six of the one image
    status, out, err = run(capsys, "sample", model, "-n", 5, "--out", tmp_path / "folder", "-q")
    assert status == 0 and len(list((tmp_path / "folder").glob("*.png"))) == 5, err

    status, out, err = run(capsys, "eval", model, "-n", 64, "--classifier", tiny_classifier, "--json",
                           tmp_path / "e.json", "-q")
    assert status == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["distinct_images"] == 1 and result["fid"] > 0  # one image, 64 times

    status, out, err = run(capsys, "bench", model, "--engines", "eager", "fused", "bf16", "--batch-sizes", 2,
                           "--repeats", 2, "-q")
    assert status == 0 and out.count("| ok |") == 3, out + err

    pytest.importorskip("fastapi")
    from genfast.serve import create_app, model_key

    from test_serve import call

    app = create_app([str(model)])
    response, = call(app, ("POST", "/v1/generate", {"model": model_key(str(model)), "n": 2, "format": "npz"}))
    assert response.status_code == 200, response.text


def test_the_neutral_defaults_of_a_family():
    family = Constant()
    config = ConstantConfig()
    assert family.prepare(config, None) == (config, {})
    assert family.evaluate({}, config, torch.zeros(1), None) == {}
    assert family.sampling_keys == () and not family.reconstructs and family.check_sampling(config) is None
    with pytest.raises(genfast.GenfastError, match="reconstructions need a model with an encoder"):
        family.reconstruct({}, config, torch.zeros(1), None)
    assert family.describe(config, {}) == "unconditional"


def test_a_family_without_its_own_hooks_is_refused_when_incomplete():
    class Half(Family):  # no train_step, no build...
        name = "half"

    with pytest.raises(TypeError, match="abstract"):
        Half()


# --- an engine written here ----------------------------------------------------------------------

class Float64(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner.double()

    def forward(self, noise, labels=None):
        return self.inner(noise.double(), labels).float()


def fp64(sampler: Sampler) -> Sampler:
    """The network in double precision: a reference engine, not a fast one."""
    return rewrap(sampler, Float64(copy.deepcopy(sampler.module).eval()))


@pytest.fixture
def fp64_engine(monkeypatch):
    monkeypatch.setitem(engines.ENGINES, "fp64", fp64)


def test_an_engine_written_in_a_test_file_works_everywhere(fp64_engine, tiny_cgan, tmp_path, capsys):
    sampler = genfast.load(tiny_cgan)
    noise, labels = sampler.noise(8, 3), sampler.labels(8)
    for name in ("fp64", "fused+fp64"):
        fast = engines.apply(sampler, name)
        assert fast.info["engine"] == name
        assert torch.allclose(fast(noise, labels), sampler(noise, labels), atol=1e-5), name

    status, out, err = run(capsys, "bench", tiny_cgan, "--engines", "eager", "fp64", "--batch-sizes", 4,
                           "--repeats", 2, "-q")
    assert status == 0 and "| fp64 | 4 | ok |" in out, out + err
    status, out, err = run(capsys, "sample", tiny_cgan, "-n", 10, "--engine", "fp64", "--out", tmp_path / "a.png",
                           "-q")
    assert status == 0, err
    status, out, err = run(capsys, "sample", tiny_cgan, "-n", 10, "--out", tmp_path / "b.png", "-q")
    a, b = (np.asarray(Image.open(tmp_path / f"{x}.png")).astype(int) for x in "ab")
    assert np.abs(a - b).max() <= 1


# --- imports ---------------------------------------------------------------------------------------

SOURCE = Path(genfast.__file__).parent
MODULES = ["genfast", *sorted(m.name for m in pkgutil.walk_packages([str(SOURCE)], prefix="genfast.")
                              if m.name != "genfast.__main__")]  # which runs the CLI
# The one genfast module imported inside a function: the server, which needs the optional
# [serve] extra (fastapi), so that the CLI's other commands run without it.
LAZY = {("genfast.cli", "genfast.serve")}


@pytest.mark.slow
def test_each_module_imports_on_its_own_in_a_fresh_interpreter():
    """Each module in its own interpreter (forked from one that has imported torch alone,
    so a cycle that import order hides elsewhere would show here)."""
    script = ("import os, sys, importlib, torch\n"
              "failed = []\n"
              "for name in sys.argv[1:]:\n"
              "    pid = os.fork()\n"
              "    if pid == 0:\n"
              "        try:\n"
              "            importlib.import_module(name)\n"
              "        except BaseException as e:\n"
              "            print(name, repr(e), flush=True)\n"
              "            os._exit(1)\n"
              "        os._exit(0)\n"
              "    if os.waitpid(pid, 0)[1]:\n"
              "        failed.append(name)\n"
              "sys.exit(1 if failed else 0)\n")
    result = subprocess.run([sys.executable, "-c", script, *MODULES], capture_output=True, text=True,
                            env=os.environ | {"PYTHONWARNINGS": "ignore"}, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(MODULES) > 25  # the walk found the package


def _source(name: str) -> ast.Module:
    path = SOURCE.joinpath(*name.split(".")[1:])
    return ast.parse((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text())


def _imported(nodes, name: str) -> set[str]:
    """The genfast modules the import statements among `nodes` import."""
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):  # import genfast.x
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:  # from genfast.x import y (a module or a name)
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                      for alias in node.names}
    return {module for module in found if module in MODULES and module != name}


def _top_level_imports(name: str) -> set[str]:
    return _imported(_source(name).body, name)


def test_genfast_modules_are_imported_at_the_top():
    """Imports inside functions are for optional or slow dependencies only; a genfast module
    imported late would be hiding a cycle."""
    late = {(name, target) for name in MODULES for target in _imported(
        [node for function in ast.walk(_source(name)) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
         for node in ast.walk(function)], name)}
    assert late == LAZY


def test_the_top_level_imports_form_no_cycle():
    graph = {name: _top_level_imports(name) for name in MODULES}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*path, name, target])
            if target not in state:
                visit(target, [*path, name])
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            visit(name, [])

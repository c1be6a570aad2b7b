"""Model files: a cascade's first stage is rebuilt from its own full config, its preprocessing
must match the cascade's, and files written by older versions still load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tumorseg import checkpoint
from tumorseg.errors import TumorsegInputError
from tumorseg.models import build_model
from tumorseg.models.two_path import TwoPathCNN, TwoPathConfig
from tumorseg.preprocess import PreprocessSettings
from tumorseg.weights import WEIGHTS_DIR, read_index

# A first stage unlike the cascade's second stage and unlike the defaults in every field that
# shapes its weights.
FIRST = TwoPathConfig(pieces=3, local_maps=(6, 5), global_maps=7, dropout=0.2, batchnorm=True,
                      init="default")
SECOND = {"local_maps": (4, 4), "global_maps": 6, "dropout": 0.0, "init": "default"}


def cascade_payload(first_preprocess: dict | None = None) -> dict:
    """A local_cascade model file's payload whose first stage is a TwoPathCNN(FIRST)."""
    torch.manual_seed(0)
    model = build_model("local_cascade", **SECOND)
    model.first = TwoPathCNN(FIRST)
    with torch.no_grad():  # batch-norm statistics that are not the initial ones
        for name, buf in model.first.named_buffers():
            if name.endswith("running_mean") or name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    meta = checkpoint.describe(model, "local_cascade", SECOND)
    settings = PreprocessSettings().to_dict()
    return {**meta, "preprocess": settings, "first_preprocess": first_preprocess or settings,
            "convention": "brats2017", "state_dict": model.state_dict()}


def test_cascade_file_rebuilds_its_first_stage_from_its_own_config(tmp_path):
    payload = cascade_payload()
    assert payload["first_options"] == dataclasses.asdict(FIRST)
    path = checkpoint.save(tmp_path / "cascade.pt", payload)
    model, _ = checkpoint.load_model(path)
    assert model.first.cfg == FIRST
    assert model.second.cfg.local_maps == (4, 4) and model.second.cfg.global_maps == 6
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(payload["state_dict"])
    differ = [k for k, v in payload["state_dict"].items() if not torch.equal(loaded[k], v)]
    assert not differ, f"tensors differ after loading: {differ[:5]}"
    assert not any(p.requires_grad for p in model.first.parameters())
    model.train()
    assert model.second.training and not model.first.training


@pytest.mark.parametrize("field, value", [("margin", 4), ("clip_percentiles", (0.5, 99.5)),
                                          ("n4", True)])
def test_cascade_file_whose_first_stage_was_preprocessed_otherwise_is_refused(tmp_path, field,
                                                                             value):
    first = dataclasses.replace(PreprocessSettings(), **{field: value})
    path = checkpoint.save(tmp_path / "cascade.pt", cascade_payload(first.to_dict()))
    cascade_value = getattr(PreprocessSettings(), field)
    with pytest.raises(TumorsegInputError) as err:
        checkpoint.load_model(path)
    message = str(err.value)
    assert message.startswith(f"{path}: a cascade's first stage must be trained with the "
                              f"cascade's preprocessing")
    assert message.endswith(f"first stage vs cascade: {field} {value} vs {cascade_value}")


def test_n4_settings_without_n4_do_not_refuse_a_first_stage(tmp_path):
    """N4's own settings change nothing while neither side corrects; with N4 on they count."""
    first = PreprocessSettings(n4_shrink=8, n4_modalities=("flair",))
    path = checkpoint.save(tmp_path / "cascade.pt", cascade_payload(first.to_dict()))
    checkpoint.load_model(path)
    on = dataclasses.replace(first, n4=True)
    path = checkpoint.save(tmp_path / "cascade_n4.pt", cascade_payload(on.to_dict()))
    with pytest.raises(TumorsegInputError, match="n4 True vs False; n4_shrink 8 vs 4; "
                                                 r"n4_modalities \('flair',\) vs"):
        checkpoint.load_model(path)


def test_cascade_file_with_three_first_options_still_loads(tmp_path):
    """Cascade files written before the full first-stage config (3 fields) and its preprocessing
    record (the input_cascade released until 2026-11-29) load, with their stored tensors, and
    a first stage of the default geometry. Made here from the released file by stripping both."""
    path = WEIGHTS_DIR / read_index()["input_cascade"]["file"]
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["first_options"] = {k: payload["first_options"][k]
                                for k in ("batchnorm", "dropout", "pieces")}
    payload.pop("first_preprocess", None)
    old = checkpoint.save(tmp_path / "old_cascade.pt", payload)
    model, _ = checkpoint.load_model(old)
    assert model.first.cfg == TwoPathConfig(**payload["first_options"])
    loaded = model.state_dict()
    differ = [k for k, v in payload["state_dict"].items() if not torch.equal(loaded[k], v.float())]
    assert not differ and sorted(loaded) == sorted(payload["state_dict"]), differ[:5]


def test_file_with_the_removed_freeze_first_option_still_loads(tmp_path):
    payload = cascade_payload()
    payload["model_options"] = {**payload["model_options"], "freeze_first": False}
    model, _ = checkpoint.load_model(checkpoint.save(tmp_path / "old.pt", payload))
    assert not any(p.requires_grad for p in model.first.parameters())


def test_release_keeps_the_first_stage_preprocessing(tmp_path):
    """weights.release copies only listed keys: the record the check reads survives it."""
    from tumorseg import weights

    first = dataclasses.replace(PreprocessSettings(), margin=4)
    src = checkpoint.save(tmp_path / "cascade.pt", cascade_payload(first.to_dict()))
    (tmp_path / "weights").mkdir()
    path = weights.release(src, "input_cascade", weights_dir=tmp_path / "weights")
    assert torch.load(path, weights_only=True)["first_preprocess"] == first.to_dict()
    with pytest.raises(TumorsegInputError, match="margin 4 vs 8$"):
        checkpoint.load_model(path)

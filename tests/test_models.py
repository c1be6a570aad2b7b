"""Models: paper parameter counts, a contract over every registered model, and the dense ==
patch-by-patch equivalence that whole-slice inference and dense-tile training rest on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tumorseg.errors import TumorsegInputError
from tumorseg.models import MODELS, build_model, dense_logits, dense_padding, params_total

PAPER_WEIGHTS = {
    "two_path": 651_488,
    "input_cascade": 802_368,
    "local_cascade": 654_368,
    "mf_cascade": 662_513,
    "local_path": 190_528,
    "global_path": 460_960,
}
RECEPTIVE_FIELD = {"two_path": 33, "local_path": 33, "global_path": 33,
                   "input_cascade": 65, "local_cascade": 56, "mf_cascade": 53}


def test_registry_covers_the_paper():
    assert set(MODELS) == set(PAPER_WEIGHTS)


@pytest.mark.parametrize("name", sorted(PAPER_WEIGHTS))
def test_params_paper_equals_the_paper(name):
    model = build_model(name)
    assert model.params_paper == PAPER_WEIGHTS[name]
    assert model.receptive_field == model.patch_size == RECEPTIVE_FIELD[name]


def test_params_paper_is_independent_of_maxout_pieces():
    assert build_model("two_path", pieces=4).params_paper == PAPER_WEIGHTS["two_path"]
    assert params_total(build_model("two_path", pieces=4)) > params_total(build_model("two_path"))


def test_unknown_model_lists_valid_names():
    with pytest.raises(TumorsegInputError, match="two_path.*input_cascade"):
        build_model("two_pth")
    with pytest.raises(TumorsegInputError, match="unknown model option"):
        build_model("two_path", colour="red")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_contract(name):
    torch.manual_seed(0)
    model = build_model(name, init="default").train()
    rf = model.receptive_field
    out = model(torch.randn(3, 4, rf, rf))
    assert out.shape == (3, 5, 1, 1)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()  # touches every logit, so every weight
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} received no gradient"
    for n, p in model.named_parameters():
        if n.startswith("first."):
            assert not p.requires_grad and p.grad is None, f"frozen {n} received a gradient"


def test_freeze_first_is_no_longer_an_option():
    """A cascade's first stage is always frozen (train() never trained it whatever this option
    said); the removed option is refused like any unknown one, naming the valid ones."""
    with pytest.raises(TumorsegInputError, match=r"unknown model option\(s\) \['freeze_first'\]"):
        build_model("input_cascade", freeze_first=False)


def test_frozen_first_stage_stays_in_eval_mode():
    model = build_model("mf_cascade").train()
    assert model.second.training and not model.first.training


def test_paper_init_sets_softmax_biases_to_log_class_frequencies():
    freq = (0.9, 0.02, 0.05, 0.01, 0.02)
    model = build_model("two_path", class_freq=freq)
    np.testing.assert_allclose(model.head.bias.detach().numpy(), np.log(freq), rtol=1e-6)
    w = model.local1.conv.weight
    assert w.abs().max() <= 0.005 and w.std() > 0.002


def test_dense_padding_gives_input_sized_output():
    assert dense_padding(33) == (16, 16)
    assert dense_padding(56) == (28, 27)
    model = build_model("local_cascade").eval()
    with torch.no_grad():
        assert dense_logits(model, torch.zeros(1, 4, 9, 14)).shape == (1, 5, 9, 14)


def _randomise_batchnorm(model):
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def _test_pixels(h, w, n_random, seed):
    """Random pixels plus the four corners and a pixel on each edge."""
    rng = np.random.default_rng(seed)
    pts = {(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1),
           (0, w // 2), (h - 1, w // 2), (h // 2, 0), (h // 2, w - 1)}
    flat = rng.choice(h * w, size=min(n_random, h * w), replace=False)
    pts |= {(int(f // w), int(f % w)) for f in flat}
    return sorted(pts)


def assert_dense_equals_patches(model, image, n_random=200, seed=0):
    """image [C, H, W]: dense output at each tested pixel == patch classifier on its patch."""
    model.eval()
    c, h, w = image.shape
    rf = model.receptive_field
    before, after = dense_padding(rf)
    with torch.no_grad():
        dense = dense_logits(model, image[None])[0]  # [5, H, W]
        padded = F.pad(image, (before, after, before, after))
        pixels = _test_pixels(h, w, n_random, seed)
        patches = torch.stack([padded[:, i:i + rf, j:j + rf] for i, j in pixels])
        patch_out = model(patches)[:, :, 0, 0]  # [N, 5]
    dense_at = torch.stack([dense[:, i, j] for i, j in pixels])
    diff = (dense_at - patch_out).abs()
    worst = int(diff.max(1).values.argmax())
    # fp32 sums in another order on each side: up to 1.25e-5 apart on AVX2-only CPUs (AMD Zen 3,
    # mf_cascade, outputs up to 0.6); a window or indexing mistake is O(0.1).
    assert torch.allclose(dense_at, patch_out, rtol=1e-4, atol=5e-5), (
        f"dense != patch: largest difference {diff.max().item():.3g} at pixel {pixels[worst]} "
        f"(dense {dense_at[worst].tolist()}, patch {patch_out[worst].tolist()})")
    return len(pixels)


VARIANTS = [dict(pieces=k, batchnorm=bn) for k in (2, 4) for bn in (False, True)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"K{v['pieces']}-{'bn' if v['batchnorm'] else 'dropout'}")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_dense_equals_patch_by_patch_random(name, variant):
    torch.manual_seed(0)
    model = build_model(name, init="default", **variant)
    _randomise_batchnorm(model)
    image = torch.randn(4, 23, 37)  # non-square, smaller than some receptive fields
    assert assert_dense_equals_patches(model, image) >= 200


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["two_path", "input_cascade", "local_cascade"])
def test_dense_equals_patch_by_patch_on_a_real_slice(name, shared_data):
    import nibabel as nib

    case = shared_data / "Brats18_2013_11_1"
    mods = ("t1", "t1ce", "t2", "flair")
    vols = [np.asanyarray(nib.load(str(case / f"{case.name}_{m}.nii.gz")).dataobj)[..., 80] for m in mods]
    image = torch.tensor(np.stack(vols), dtype=torch.float32)[:, 40:200, 30:222]  # 160 x 192
    image = (image - image.mean()) / image.std()
    torch.manual_seed(0)
    model = build_model(name, init="default", batchnorm=True)
    _randomise_batchnorm(model)
    assert assert_dense_equals_patches(model, image, n_random=250, seed=3) >= 200


def test_models_cli_json(capsys):
    from tumorseg.cli import main

    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(MODELS)
    for name, row in rows.items():
        assert set(row) >= {"name", "patch_size", "receptive_field", "params_paper", "params_total"}
        assert row["params_paper"] == PAPER_WEIGHTS[name]
        assert row["params_total"] == params_total(build_model(name))
        assert row["receptive_field"] == RECEPTIVE_FIELD[name]

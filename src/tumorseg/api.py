"""The Python API: load a model, segment a case, evaluate a segmentation.

    import tumorseg

    model = tumorseg.load_model()                       # the released default (two_path)
    seg = tumorseg.segment_case("BraTS_case_folder", model)
    seg.labels                                          # (x, y, z) uint8, input's grid
    seg.volumes                                         # {"whole_ml": ..., "core_ml": ...}
    tumorseg.evaluate(seg.labels, "BraTS_case_folder/case_seg.nii.gz")["whole"]["dice"]

These wrap the pipeline behind the CLI (tumorseg.segment, tumorseg.metrics): the same
preprocessing, dense inference, post-processing and geometry, so `segment_case` gives the labels
`tumorseg segment` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from tumorseg.datasets import Case, find_cases
from tumorseg.errors import TumorsegInputError


@dataclass
class Model:
    """A loaded model: `network` (torch module, eval mode) and the `meta` of its file
    (architecture, preprocessing settings, model space, label convention)."""

    network: torch.nn.Module
    meta: dict

    @property
    def name(self) -> str:
        """The released name (two_path, input_cascade) or the architecture of a model file."""
        return str(self.meta.get("released") or self.meta.get("model", "?"))

    @property
    def receptive_field(self) -> int:
        """Side in pixels of the input patch each output pixel sees (33 for two_path)."""
        return int(self.network.receptive_field)


def load_model(name_or_path: str | Path | None = None, device: str = "cpu") -> Model:
    """A released model by name ("two_path", "input_cascade"; None = the default) or a model
    file written by `tumorseg train`. Raises TumorsegInputError for an unknown name, a missing
    or corrupt file, or a file whose sha256 differs from the released one."""
    from tumorseg.infer import resolve_device
    from tumorseg.weights import resolve_model

    network, meta = resolve_model(name_or_path, device=resolve_device(device))
    return Model(network, meta)


@dataclass
class Segmentation:
    """One case segmented by `segment_case`.

    labels: (x, y, z) uint8 label map in `convention`'s values, on the input's grid (same shape
        as the input; `affine` is the input's voxel -> RAS+ mm transform).
    probabilities: (x, y, z, 5) float32 softmax of the canonical classes (0 other, 1 necrosis,
        2 oedema, 3 non-enhancing, 4 enhancing), before post-processing; None unless asked for.
    volumes: whole / core / enhancing volume in mL and voxels per label value
        (tumorseg.metrics.label_volumes).
    warnings: doubts about the input (not skull-stripped? not co-registered?).
    files: {"labels", "probabilities", "overlay"} paths written when `out_dir` was given.
    """

    case_id: str
    labels: np.ndarray
    convention: str
    affine: np.ndarray
    spacing: tuple[float, float, float]
    probabilities: np.ndarray | None
    volumes: dict
    warnings: list[str] = field(default_factory=list)
    files: dict = field(default_factory=dict)


def _as_case(case: str | Path | Case | Mapping[str, str | Path]) -> Case:
    from tumorseg.segment import files_case

    if isinstance(case, Case):
        return case
    if isinstance(case, Mapping):
        missing = [m for m in ("t1", "t1c", "t2", "flair") if m not in case]
        if missing:
            raise TumorsegInputError(None, f"explicit files need t1, t1c, t2 and flair; "
                                           f"missing {', '.join(missing)}")
        return files_case(case["t1"], case["t1c"], case["t2"], case["flair"])
    found = find_cases(case)
    if len(found) != 1:
        raise TumorsegInputError(case, f"holds {len(found)} cases: give one case folder "
                                       "(use tumorseg.segment.segment_cases for a dataset)")
    return found[0]


def segment_case(case: str | Path | Case | Mapping[str, str | Path],
                 model: Model | str | Path | None = None, out_dir: str | Path | None = None,
                 options=None) -> Segmentation:
    """Segment one case.

    case: a case folder (any layout tumorseg reads), a tumorseg.Case, or a mapping
        {"t1", "t1c", "t2", "flair"} -> file.
    model: a `Model`, or what `load_model` takes (None = the released default).
    out_dir: also write the files `tumorseg segment` writes (label map, and the probabilities
        and overlay if `options` asks for them) into this folder.
    options: tumorseg.segment.SegmentOptions (TTA, probabilities, post-processing, output
        convention, engine...); default: the CLI's defaults.
    Raises TumorsegInputError (one line naming the file) for bad input.
    """
    from tumorseg.labels import get_convention
    from tumorseg.metrics import label_volumes
    from tumorseg.segment import SegmentOptions, compute_case, prepare_case, write_case

    model = model if isinstance(model, Model) else load_model(model)
    options = options or SegmentOptions()
    the_case = _as_case(case)
    conv = get_convention(options.convention or the_case.convention)
    prepared = prepare_case(the_case, model.meta)
    reference = prepared.loaded.reference
    out = compute_case(model.network, model.meta, prepared, options)
    files = {}
    if out_dir is not None:
        written = write_case(model.meta, out, out_dir, options)
        files = {k: written[k] for k in ("labels", "probabilities", "overlay") if written[k]}
    labels = conv.decode(out.labels)
    return Segmentation(the_case.case_id, labels, conv.name, reference.affine,
                        reference.spacing, out.probabilities,
                        label_volumes(labels, conv, reference.spacing),
                        list(prepared.warnings), files)


def evaluate(prediction: np.ndarray | str | Path, reference: np.ndarray | str | Path,
             convention: str = "brats2017",
             spacing: tuple[float, float, float] | None = None) -> dict[str, dict[str, float]]:
    """BraTS metrics of a prediction against a reference: {region: {"dice", "hd95",
    "sensitivity", "specificity", "ppv"}} for whole / core / enhancing (tumorseg.metrics; empty
    vs empty scores Dice 1 and HD95 0).

    prediction, reference: label files or (x, y, z) arrays in `convention`'s values. spacing
        (mm) for HD95: the reference file's, else this argument, else 1 mm isotropic.
    Raises TumorsegInputError for label values outside the convention or differing shapes.
    """
    from tumorseg import io
    from tumorseg.labels import get_convention
    from tumorseg.metrics import region_metrics

    conv = get_convention(convention)
    arrays = []
    for what, item in (("prediction", prediction), ("reference", reference)):
        if isinstance(item, (str, Path)):
            vol = io.read_volume(item)
            if what == "reference" and spacing is None:
                spacing = vol.spacing
            item = vol.data
        item = np.asarray(item)
        conv.encode(item, where=what)  # validates the values
        arrays.append(item)
    if arrays[0].shape != arrays[1].shape:
        raise TumorsegInputError(None, f"prediction shape {arrays[0].shape} != reference shape "
                                       f"{arrays[1].shape}")
    return region_metrics(arrays[0], arrays[1], conv, spacing or (1.0, 1.0, 1.0))

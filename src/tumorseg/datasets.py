"""Finding and loading cases in every common brain-tumour dataset layout.

Layouts (detected from file names; `layout=` overrides):

    brats2013  BRATS 2012-2015 .mha trees: <case>/VSD.Brain.XX.O.MR_T1c.<n>/<same name>.mha,
               ground truth VSD.Brain_3more.XX.O.OT.<n>; tokens between dots are matched exactly
    brats2017  BraTS 2017-2021: <case>/<id>_{flair,t1,t1ce,t2,seg}.nii(.gz)
    brats2023  BraTS 2023+: <case>/<id>-{t1n,t1c,t2w,t2f,seg}.nii(.gz)
    msd        Medical Segmentation Decathlon Task01: imagesTr/<id>.nii.gz 4-D (x, y, z, 4),
               labelsTr/<id>.nii.gz, channel order from dataset.json "modality"
    nnunet     nnU-Net raw data: imagesTr/<id>_0000.nii.gz .. _0003, labelsTr/<id>.nii.gz,
               channel order from dataset.json "channel_names" (or "modality")

For msd and nnunet, the label convention comes from dataset.json's "labels" when present
(MSD, BraTS 2017 and BraTS 2023 label sets are recognised by name and value), else MSD's.

Whatever the layout, `load_case` returns images as (4, x, y, z) float32 in MODALITIES order and
labels as canonical classes (see tumorseg.labels), with the volume to write results against.
"""

from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tumorseg.errors import TumorsegInputError
from tumorseg.io import NIFTI_SUFFIXES, Volume, numpy_huge_pages, read_volume, volume_suffix
from tumorseg.labels import get_convention

MODALITIES = ("t1", "t1c", "t2", "flair")  # the package-wide channel order
LAYOUTS = ("brats2013", "brats2017", "brats2023", "msd", "nnunet")
DEFAULT_CONVENTION = {
    "brats2013": "brats2013",
    "brats2017": "brats2017",
    "brats2023": "brats2023",
    "msd": "msd",
    "nnunet": "msd",  # nnU-Net's Dataset001_BrainTumour keeps MSD Task01's labels
}

# File-name token -> modality (or "seg"), per layout.
_BRATS2017_TOKENS = {"flair": "flair", "t1": "t1", "t1ce": "t1c", "t2": "t2", "seg": "seg"}
_BRATS2023_TOKENS = {"t1n": "t1", "t1c": "t1c", "t2w": "t2", "t2f": "flair", "seg": "seg"}
_BRATS2013_TOKENS = {"mr_flair": "flair", "mr_t1": "t1", "mr_t1c": "t1c", "mr_t2": "t2"}
_IMAGE_FOLDERS = {"imagesTr": "labelsTr", "imagesTs": "labelsTs"}
_NNUNET_STEM = re.compile(r"^(.+)_(\d{4})$")
# MSD Task01 / nnU-Net Dataset001 order: FLAIR, T1, T1gd, T2.
_DEFAULT_CHANNELS = {"flair": 0, "t1": 1, "t1c": 2, "t2": 3}
# Channel names found in dataset.json files, normalised (lower case, no '-', '_' or spaces).
_CHANNEL_NAMES = {
    "flair": "flair", "t2f": "flair", "t2flair": "flair",
    "t1": "t1", "t1w": "t1", "t1n": "t1", "native": "t1",
    "t1c": "t1c", "t1gd": "t1c", "t1ce": "t1c", "t1wce": "t1c",
    "t2": "t2", "t2w": "t2",
}  # fmt: skip
_DISPLAY = {"flair": "FLAIR", "t1": "T1", "t1c": "T1gd", "t2": "T2"}
# Modality -> file-name part, and how a missing file would be named, for error messages.
_FILE_TOKEN = {
    "brats2017": {m: t for t, m in _BRATS2017_TOKENS.items()},
    "brats2023": {m: t for t, m in _BRATS2023_TOKENS.items()},
    "brats2013": {"flair": "MR_Flair", "t1": "MR_T1", "t1c": "MR_T1c", "t2": "MR_T2"},
}
_EXPECTED = {
    "brats2017": "{id}_{tok}.nii.gz",
    "brats2023": "{id}-{tok}.nii.gz",
    "brats2013": "VSD.Brain.XX.O.{tok}.<n>.mha",
}


@dataclass(frozen=True)
class Case:
    """One case on disk.

    images: modality -> file; for 4-D files (msd) every modality points to the same file.
    channels: modality -> channel index inside a 4-D file; empty for 3-D files.
    label: ground-truth file in `convention`, or None (test cases).
    """

    case_id: str
    layout: str
    convention: str
    images: dict[str, Path]
    channels: dict[str, int] = field(default_factory=dict)
    label: Path | None = None


@dataclass
class LoadedCase:
    """A case in memory.

    image: (4, x, y, z) float32 in MODALITIES order, raw file units.
    label: (x, y, z) uint8 canonical classes, or None.
    reference: the volume to write outputs against (T1 for 3-D layouts, the 4-D file for msd);
        io.write_volume(path, (x, y, z) data, reference) writes in the input's space.
    spacing: voxel size in mm (x, y, z).
    """

    case: Case
    image: np.ndarray
    label: np.ndarray | None
    reference: Volume
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class _Hit:
    """A file recognised as part of a case in one layout."""

    layout: str
    case_dir: Path
    case_id: str
    role: str | int  # modality, "seg", "image4d" (msd) or channel index (nnunet)
    path: Path


def files_case(t1: str | Path, t1c: str | Path, t2: str | Path, flair: str | Path,
               convention: str | None = None, case_id: str | None = None) -> Case:
    """A Case from four explicit 3-D files (layout "files"; convention default brats2017).

    The case id is the part of the file names the four share, cut at a '_', '-' or '.' (e.g.
    Brats18_2013_11_1 for Brats18_2013_11_1_{t1,t1ce,t2,flair}.nii.gz), else the T1 file name.
    """
    images = {"t1": Path(t1), "t1c": Path(t1c), "t2": Path(t2), "flair": Path(flair)}
    if case_id is None:
        stems = []
        for p in images.values():
            suffix = volume_suffix(p)
            stems.append(p.name[: -len(suffix)] if suffix else p.stem)
        prefix = os.path.commonprefix(stems)
        if prefix not in stems:  # cut a partial token: "X_t" of X_t1, X_t1ce, X_t2 -> "X"
            prefix = prefix[: max(prefix.rfind(c) for c in "_-.") + 1]
        case_id = prefix.rstrip("_-. ") or stems[0]
    return Case(case_id, "files", convention or "brats2017", images)


def _brats2013_role(name: str) -> str | None:
    """Role of a BRATS 2012-2015 file or folder name, from its dot-separated tokens."""
    tokens = [t.lower() for t in name.split(".")]
    for token in tokens:
        if token in _BRATS2013_TOKENS:  # exact: 'mr_t1' never matches 'mr_t1c'
            return _BRATS2013_TOKENS[token]
    if "ot" in tokens and any(t.endswith("more") for t in tokens):
        return "seg"
    return None


def _match(path: Path) -> list[_Hit]:
    """Every layout that the name of volume file `path` fits (usually zero or one)."""
    suffix = volume_suffix(path)
    if suffix is None:
        return []
    stem, parent, hits = path.name[: -len(suffix)], path.parent, []
    role = _brats2013_role(stem)
    if role is not None:
        case_dir = parent.parent if _brats2013_role(parent.name) else parent
        hits.append(_Hit("brats2013", case_dir, case_dir.name, role, path))
    if suffix not in NIFTI_SUFFIXES or parent.name in _IMAGE_FOLDERS.values():
        return hits  # label folders are read from the image side
    nn = _NNUNET_STEM.match(stem)
    if parent.name in _IMAGE_FOLDERS:
        if nn:
            hits.append(_Hit("nnunet", parent, nn.group(1), int(nn.group(2)), path))
        else:
            hits.append(_Hit("msd", parent, stem, "image4d", path))
        return hits
    for layout, sep, tokens in (
        ("brats2017", "_", _BRATS2017_TOKENS),
        ("brats2023", "-", _BRATS2023_TOKENS),
    ):
        prefix, found, token = stem.rpartition(sep)
        if found and prefix and token.lower() in tokens:
            hits.append(_Hit(layout, parent, prefix, tokens[token.lower()], path))
    if nn:  # a flat nnU-Net inference folder
        hits.append(_Hit("nnunet", parent, nn.group(1), int(nn.group(2)), path))
    return hits


def _walk(root: Path) -> list[Path]:
    """Volume files under root (sorted), skipping hidden files and folders ('._x', '.tmp').

    Symbolic links to folders are followed (a subset of a dataset is often a folder of links
    to case folders); a link back to a folder already walked is skipped, so cycles end."""
    found = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return found


def find_cases(
    root: str | Path,
    layout: str | None = None,
    labels: str | None = None,
    errors: list | None = None,
) -> list[Case]:
    """Find every case under `root` (a dataset root at any depth, or one case folder).

    layout: one of LAYOUTS, detected from file names when None.
    labels: label convention name (tumorseg.labels.CONVENTIONS); default per layout.
    errors: if a list is given, bad cases are appended as (case_id_or_path, TumorsegInputError)
        and skipped; otherwise the first bad case raises.
    Returns cases sorted by case_id. Raises TumorsegInputError (one line, naming the file).
    """
    root = Path(root)
    if not root.exists():
        raise TumorsegInputError(root, "folder does not exist")
    if not root.is_dir():
        raise TumorsegInputError(root, "not a folder: expected a dataset root or a case folder")
    if layout is not None and layout not in LAYOUTS:
        raise TumorsegInputError(None, f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if labels is not None:
        get_convention(labels)  # validates the name
    hits = [h for p in _walk(root) for h in _match(p)]
    by_layout: dict[str, list[_Hit]] = {}
    for h in hits:
        by_layout.setdefault(h.layout, []).append(h)
    if layout is None:
        if len(by_layout) > 1:
            examples = "; ".join(
                f"{k}: {v[0].path.relative_to(root)}" for k, v in sorted(by_layout.items())
            )
            raise TumorsegInputError(
                root, f"ambiguous layout, files match several layouts ({examples}); pass --layout"
            )
        layout = next(iter(by_layout), None)
    if layout is None:
        raise TumorsegInputError(
            root, f"no cases found: expected one of the layouts {', '.join(LAYOUTS)}"
        )
    if layout not in by_layout:
        raise TumorsegInputError(root, f"no cases found in layout {layout}")
    convention = labels or DEFAULT_CONVENTION[layout]

    groups: dict[tuple[Path, str], list[_Hit]] = {}
    for h in by_layout[layout]:
        groups.setdefault((h.case_dir, h.case_id), []).append(h)
    ids = _case_ids(root, layout, list(groups))
    channel_orders: dict[Path, dict[str, int]] = {}
    json_conventions: dict[Path, str] = {}
    cases: dict[str, Case] = {}
    folders: dict[str, Path] = {}
    for (case_dir, _), group in sorted(groups.items(), key=lambda kv: ids[kv[0]]):
        cid = ids[(case_dir, group[0].case_id)]
        if layout in ("msd", "nnunet"):  # dataset.json errors concern every case: always raise
            key = case_dir.parent if case_dir.name in _IMAGE_FOLDERS else case_dir
            if key not in channel_orders:
                channel_orders[key] = _channel_order(key / "dataset.json")
                json_conventions[key] = labels or _label_convention(key / "dataset.json") \
                    or convention
        try:
            if cid in cases:
                raise TumorsegInputError(
                    case_dir, f"duplicate case id {cid!r}, also in {folders[cid]}"
                )
            if layout in ("msd", "nnunet"):
                case = _build_4d(cid, layout, json_conventions[key], case_dir, group,
                                 channel_orders[key])
            else:
                case = _build_3d(cid, layout, convention, case_dir, group)
        except TumorsegInputError as err:
            if errors is None:
                raise
            errors.append((cid, err))
            continue
        cases[cid], folders[cid] = case, case_dir
    return [cases[k] for k in sorted(cases)]


def _case_ids(root: Path, layout: str, keys: list[tuple[Path, str]]) -> dict[tuple[Path, str], str]:
    """Case ids; BRATS 2013 folder names repeat (HG/0001, LG/0001), so qualify those by path."""
    ids = {k: k[1] for k in keys}
    if layout == "brats2013":
        names = [k[1] for k in keys]
        for k in keys:
            if names.count(k[1]) > 1 and k[0] != root and root in k[0].parents:
                ids[k] = "_".join(k[0].relative_to(root).parts)
    return ids


def _single(case_dir: Path, role: str, files: list[Path]) -> Path:
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise TumorsegInputError(
            case_dir, f"{len(files)} files for {role} ({names}); expected exactly one"
        )
    return files[0]


def _build_3d(cid: str, layout: str, convention: str, case_dir: Path, group: list[_Hit]) -> Case:
    by_role: dict[str, list[Path]] = {}
    for h in group:
        by_role.setdefault(str(h.role), []).append(h.path)
    images = {}
    for m in MODALITIES:
        if m not in by_role:
            expected = _EXPECTED[layout].format(id=cid, tok=_FILE_TOKEN[layout][m])
            raise TumorsegInputError(case_dir, f"missing modality {m}: no file {expected}")
        images[m] = _single(case_dir, f"modality {m}", by_role[m])
    label = _single(case_dir, "the label", by_role["seg"]) if "seg" in by_role else None
    return Case(cid, layout, convention, images, {}, label)


def _build_4d(
    cid: str, layout: str, convention: str, folder: Path, group: list[_Hit], order: dict[str, int]
) -> Case:
    suffix = volume_suffix(group[0].path)
    label = None
    if folder.name in _IMAGE_FOLDERS:  # imagesTr -> labelsTr, imagesTs -> labelsTs
        label_dir = folder.parent / _IMAGE_FOLDERS[folder.name]
        candidates = [label_dir / f"{cid}{s}" for s in NIFTI_SUFFIXES]
        candidates = [p for p in candidates if p.is_file()]
        label = _single(label_dir, "the label", candidates) if candidates else None
    if layout == "msd":
        path = _single(folder, f"case {cid}", [h.path for h in group])
        return Case(cid, layout, convention, {m: path for m in MODALITIES}, dict(order), label)
    by_channel: dict[int, list[Path]] = {}
    for h in group:
        by_channel.setdefault(int(h.role), []).append(h.path)
    extra = sorted(set(by_channel) - set(order.values()))
    if extra:
        name = by_channel[extra[0]][0].name
        raise TumorsegInputError(
            folder / name, f"unexpected channel {extra[0]:04d}: expected 4 channels, 0000-0003"
        )
    images = {}
    for m in MODALITIES:
        ch = order[m]
        if ch not in by_channel:
            expected = f"{cid}_{ch:04d}{suffix}"
            raise TumorsegInputError(folder, f"missing modality {m}: no file {expected}")
        images[m] = _single(folder, f"modality {m}", by_channel[ch])
    return Case(cid, layout, convention, images, {}, label)


def _read_json(path: Path) -> dict | None:
    """dataset.json's content, None if absent; unreadable is an error naming the file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TumorsegInputError(path, f"cannot read dataset.json: {exc}") from None


# Label names found in dataset.json files (normalised as channel names) -> meaning.
_LABEL_MEANINGS = {
    "background": "background",
    "edema": "oedema", "oedema": "oedema", "ed": "oedema", "snfh": "oedema",
    "peritumoraledema": "oedema", "surroundingnonenhancingflairhyperintensity": "oedema",
    "nonenhancingtumor": "non-enhancing", "nonenhancingtumour": "non-enhancing",
    "netc": "non-enhancing", "ncr": "non-enhancing", "ncr/net": "non-enhancing",
    "necrosis": "non-enhancing", "necrotictumorcore": "non-enhancing",
    "nonenhancingtumorcore": "non-enhancing", "necrotic": "non-enhancing",
    "enhancingtumor": "enhancing", "enhancingtumour": "enhancing", "et": "enhancing",
    "enhancing": "enhancing",
}  # fmt: skip
# (oedema, non-enhancing/necrotic core, enhancing) file values -> convention.
_LABEL_VALUES = {(1, 2, 3): "msd", (2, 1, 3): "brats2023", (2, 1, 4): "brats2017"}


def _label_convention(path: Path) -> str | None:
    """The label convention a dataset.json's "labels" declare (MSD style {"1": "edema"} or
    nnU-Net v2 style {"edema": 1}); None without a dataset.json or a "labels" entry.
    Labels that match no known convention (or nnU-Net's region lists) are an error: guessing
    would swap classes silently (a BraTS 2023 dataset read as MSD swaps necrosis and oedema)."""
    meta = _read_json(path)
    raw = meta.get("labels") if isinstance(meta, dict) else None
    if not raw or not isinstance(raw, dict):
        return None
    pairs = []
    for key, value in raw.items():
        value_is_int = isinstance(value, int) and not isinstance(value, bool)
        name, number = (key, value) if value_is_int else (value, key)
        try:
            pairs.append((re.sub(r"[-_ ]", "", str(name).lower()), int(number)))
        except (TypeError, ValueError):
            raise TumorsegInputError(path, f"labels {raw}: expected one integer value per label "
                                           "(region lists are not supported)") from None
    meaning = {}
    for name, number in pairs:
        if name in _LABEL_MEANINGS:
            meaning[_LABEL_MEANINGS[name]] = number
    values = (meaning.get("oedema"), meaning.get("non-enhancing"), meaning.get("enhancing"))
    if values not in _LABEL_VALUES or len(pairs) != 4:
        raise TumorsegInputError(path, f"labels {raw} match no known convention (MSD, BraTS "
                                       "2017, BraTS 2023): pass --labels")
    return _LABEL_VALUES[values]


def _channel_order(path: Path) -> dict[str, int]:
    """modality -> channel index from an MSD / nnU-Net dataset.json; the default if absent."""
    meta = _read_json(path)
    if meta is None:
        return dict(_DEFAULT_CHANNELS)
    names = (meta.get("channel_names") or meta.get("modality")) if isinstance(meta, dict) else None
    if not names:
        return dict(_DEFAULT_CHANNELS)
    order: dict[str, int] = {}
    try:
        for key, name in dict(names).items():
            norm = re.sub(r"[-_ ]", "", str(name).lower())
            order[_CHANNEL_NAMES[norm]] = int(key)
    except (KeyError, ValueError, TypeError):
        order = {}
    if sorted(order) != sorted(MODALITIES) or len(set(order.values())) != 4 or len(names) != 4:
        raise TumorsegInputError(
            path, f"channel names {names} must name FLAIR, T1, T1c (T1gd) and T2 once each"
        )
    return order


_read_ahead: list[tuple[Case, Future]] = []  # at most one case being read in the background
_read_ahead_lock = threading.Lock()


def read_ahead(case: Case) -> None:
    """Start reading `case` in a background thread: the next `load_case` of an equal case
    takes that result (or its error) instead of reading again. The CLI calls it before it
    imports torch, so that decompressing the images (zlib, which releases the GIL) overlaps
    the import. One case at a time: a later call replaces an unclaimed one. Like
    segmentation, it turns numpy's huge pages off first (tumorseg.io.numpy_huge_pages), or
    this first read would pay their slow first touch."""
    numpy_huge_pages(False)
    pool = ThreadPoolExecutor(1, thread_name_prefix="tumorseg-read-ahead")
    future = pool.submit(_load_case, case)
    pool.shutdown(wait=False)
    with _read_ahead_lock:
        _read_ahead[:] = [(case, future)]


def discard_read_ahead() -> None:
    """Forget an unclaimed read-ahead (a command that failed before reading its case)."""
    with _read_ahead_lock:
        _read_ahead.clear()


def load_case(case: Case) -> LoadedCase:
    """Read and validate one case; see LoadedCase for shapes and units.

    Raises TumorsegInputError naming the file for: wrong number of dimensions or channels,
    shapes or affines that differ between files, NaN/Inf, an all-zero modality, a label map of
    another shape or with values outside the case's convention, unreadable files.
    """
    with _read_ahead_lock:
        claimed = [f for c, f in _read_ahead if c == case]
        if claimed:
            _read_ahead.clear()
    return claimed[0].result() if claimed else _load_case(case)


def _load_case(case: Case) -> LoadedCase:
    if case.channels:
        path = case.images[MODALITIES[0]]
        vol = read_volume(path, allowed_ndim=(3, 4))
        n = vol.data.shape[3] if vol.data.ndim == 4 else 1
        if n != 4:
            names = ", ".join(_DISPLAY[m] for m in sorted(case.channels, key=case.channels.get))
            raise TumorsegInputError(path, f"expected 4 channels ({names}), found {n}")
        image = np.stack([vol.data[..., case.channels[m]] for m in MODALITIES]).astype(np.float32)
        reference, sources = vol, {m: path for m in MODALITIES}
    else:
        # Decompressed two at a time (zlib releases the GIL): 0.19 -> 0.13 s on BraTS, 2 cores.
        with ThreadPoolExecutor(2) as pool:
            vols = dict(zip(MODALITIES, pool.map(
                lambda m: read_volume(case.images[m], allowed_ndim=(3,)), MODALITIES)))
        reference = vols["t1"]
        for vol in vols.values():
            _check_geometry(vol, reference)
        image = np.stack([vols[m].data for m in MODALITIES], dtype=np.float32)
        del vols
        sources = {m: case.images[m] for m in MODALITIES}
    for i, m in enumerate(MODALITIES):
        if not np.any(image[i]):
            what = f"modality {m}"
            if case.channels:
                what = f"channel {case.channels[m]} ({_DISPLAY[m]})"
            raise TumorsegInputError(sources[m], f"{what} is all zero")
        if _few_values(image[i]):
            what = f"channel {case.channels[m]} ({_DISPLAY[m]})" if case.channels else f"modality {m}"
            raise TumorsegInputError(sources[m], f"{what} has fewer than {MIN_DISTINCT} distinct "
                                                 "non-zero values: not an MRI (a mask or a "
                                                 "constant image?)")
    label = None
    if case.label is not None:
        lab = read_volume(case.label, allowed_ndim=(3,))
        _check_geometry(lab, reference, what="label")
        label = get_convention(case.convention).encode(lab.data, where=str(case.label))
    return LoadedCase(case, image, label, reference, reference.spacing)


MIN_DISTINCT = 10  # fewer distinct non-zero intensities than this: not an MR image

# Input checks that warn (the result may still be right): the models were trained on BraTS data,
# skull-stripped and co-registered. On the 24 BraTS 2018 cases in ../shared the brain (non-zero
# in any modality) is 1.2-1.75 L, at most 1.4% of the volume's border voxels are non-zero, and
# every modality's non-zero mask has Dice >= 0.987 with T1's. A head with skull and scalp is
# 3-5 L and a noisy background fills the border.
MAX_BRAIN_LITRES = 2.5
MAX_BORDER_FRACTION = 0.25
MIN_MASK_DICE = 0.9


def input_warnings(loaded: LoadedCase) -> list[str]:
    """Reasons to doubt that a loaded case is BraTS-like (skull-stripped, co-registered), as
    one-line messages; empty for BraTS data. Thresholds: MAX_BRAIN_LITRES,
    MAX_BORDER_FRACTION, MIN_MASK_DICE (volumes in litres from the voxel spacing)."""
    nonzero = loaded.image != 0  # (4, x, y, z)
    brain = nonzero.any(axis=0)
    out = []
    litres = float(np.count_nonzero(brain)) * float(np.prod(loaded.spacing)) / 1e6
    faces = [brain[0], brain[-1], brain[:, 0], brain[:, -1], brain[:, :, 0], brain[:, :, -1]]
    border = sum(int(np.count_nonzero(f)) for f in faces) / sum(f.size for f in faces)
    if litres > MAX_BRAIN_LITRES or border > MAX_BORDER_FRACTION:
        out.append(f"does not look skull-stripped (non-zero volume {litres:.2f} L, "
                   f"{100 * border:.0f}% of the border non-zero; a stripped brain is about "
                   f"1.2-1.8 L with an empty border): the models were trained on skull-stripped "
                   f"BraTS data, check the result")
    t1 = nonzero[0]
    for i, m in enumerate(MODALITIES[1:], start=1):
        both = int(np.count_nonzero(nonzero[i] & t1))
        total = int(np.count_nonzero(nonzero[i])) + int(np.count_nonzero(t1))
        dice = 2.0 * both / total if total else 1.0
        if dice < MIN_MASK_DICE:
            out.append(f"the non-zero region of {m} overlaps T1's poorly (Dice {dice:.2f}): "
                       f"are the modalities co-registered and skull-stripped alike?")
    return out


def _few_values(vol: np.ndarray) -> bool:
    """True if `vol` has fewer than MIN_DISTINCT distinct non-zero values. A strided sample
    answers for real images in milliseconds; only a suspicious one is checked in full."""
    if len(np.unique(vol.ravel()[::101])) > MIN_DISTINCT:
        return False
    return len(np.unique(vol[vol != 0])) < MIN_DISTINCT


def _check_geometry(vol: Volume, ref: Volume, what: str = "image") -> None:
    """Co-registration: same shape, and affines equal to 1e-3 mm."""
    if vol is ref:
        return
    if vol.shape3 != ref.shape3:
        raise TumorsegInputError(
            vol.path,
            f"{what} shape {vol.shape3} differs from shape {ref.shape3} of {ref.path.name}",
        )
    if not np.allclose(vol.affine, ref.affine, atol=1e-3):
        diff = float(np.abs(vol.affine - ref.affine).max())
        raise TumorsegInputError(
            vol.path, f"{what} affine differs from the affine of {ref.path.name} (max difference "
            f"{diff:.4g}); all files of a case must be co-registered",
        )

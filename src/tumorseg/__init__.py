"""tumorseg: brain tumour segmentation in multimodal MRI, after Havaei et al. (2017).

Arrays are indexed (x, y, z) as nibabel returns them; multimodal images are (4, x, y, z) with
channels in `MODALITIES` order (T1, T1c, T2, FLAIR). See docs/ARCHITECTURE.md for the data flow.

The Python API (tumorseg.api): `load_model`, `segment_case`, `evaluate`.
"""

from tumorseg.datasets import MODALITIES, Case, find_cases, load_case
from tumorseg.errors import TumorsegInputError

__version__ = "0.1.0"
__all__ = ["MODALITIES", "Case", "Model", "Segmentation", "TumorsegInputError", "evaluate",
           "find_cases", "load_case", "load_model", "segment_case", "__version__"]

_API = ("Model", "Segmentation", "evaluate", "load_model", "segment_case")


def __getattr__(name: str):
    # tumorseg.api imports torch (~1.5 s): only when one of its names is used, so that the
    # CLI can start reading a case meanwhile and commands that need no model start at once.
    if name in _API:
        from tumorseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'tumorseg' has no attribute {name!r}")

"""Make torchvision's Python part importable where its compiled operators do not load.

open_clip, timm and clean-fid import torchvision. PyPI's torchvision wheels are CUDA builds; beside a CPU-only torch
their operator library fails to load and `import torchvision` then raises "operator torchvision::nms does not
exist" while registering fake kernels for nms and qnms. transformers imports torchvision whenever it is installed,
so the same failure also breaks CLIP models from transformers. Evaluation needs only transforms and model code,
never those operators: declaring their schemas lets the import finish. This is the only place that does it, and
only after a real import failed, so a working torchvision is left alone. bigsid's training code never imports it."""

from __future__ import annotations

import importlib.util
import sys

_SCHEMAS = {"nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"}
_library = None  # the torch.library.Library that holds the schemas must live as long as the process


def ensure_importable() -> None:
    global _library
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torch

        _library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS.values():
            _library.define(schema)
        import torchvision  # noqa: F401,F811

"""The embedded demo: a generated shapes dataset with planted truth and a small CNN trained on it.

Nothing is downloaded: :mod:`crp_invert.demo.data` draws the images from a seed and the model
weights ship with the package (``crp_invert/data/demo_model.pt``, trained by
:mod:`crp_invert.demo.train`). Names are imported lazily, so ``import crp_invert.demo`` is cheap.
"""
import importlib
from typing import Any

_EXPORTS = {
    "SHAPES": "data",
    "COLORS": "data",
    "SIZES": "data",
    "TEXTURES": "data",
    "PARENTS": "data",
    "CLASS_NAMES": "data",
    "ShapesSample": "data",
    "ShapesDataset": "data",
    "generate_shapes": "data",
    "attribute_matrix": "data",
    "attribute_concepts": "data",
    "concept_names": "data",
    "class_attributes": "data",
    "class_formulas": "data",
    "DemoCNN": "model",
    "load_demo_model": "model",
    "DEMO_EVAL_SEED": "model",
    "DEMO_EVAL_SIZE": "model",
    "DEMO_MODEL_PATH": "model",
    "DEMO_MODEL_ACCURACY": "model",
    "planted_truth_score": "truth",
    "planted_truth_matches": "truth",
    "match_explanations_to_classes": "truth",
    "best_formulas": "truth",
    "explanation_accuracy": "truth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'crp_invert.demo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__

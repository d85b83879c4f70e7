"""crp-invert: INVERT concept labels for the channels of a network, on top of zennit and zennit-crp.

Public names are imported lazily (PEP 562), so that ``import crp_invert`` does no work and does
not import CRP, h5py or matplotlib until a name that needs them is used.
"""
import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # core (plain tensors, no model needed)
    "Formula": "formula",
    "ConceptLabels": "concepts",
    "ConceptLabeler": "labeler",
    "LayerLabels": "labeler",
    "Explanation": "labeler",
    "beam_search": "search",
    # CRP integration and storage
    "ActivationCache": "cache",
    "FlatActivationWriter": "cache",
    "InvertFeatureVisualization": "recording",
    "record_activations": "recording",
    # glocal explanations
    "decompose": "glocal",
    "GlocalExplanation": "glocal",
    "circuit_by_weight": "glocal",
    "circuit_by_relevance": "glocal",
    "concept_circuit": "glocal",
    "decompose_batch": "glocal",
    "channel_relevances": "glocal",
    "Circuit": "glocal",
    "FuzzyCircuit": "fuzzy",
    "Fuzzifier": "fuzzy",
    "write_report": "report",
    "run_demo": "demo.pipeline",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'crp_invert' has no attribute {name!r}")
    module = importlib.import_module(f".{module_name}", __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__

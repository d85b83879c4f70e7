"""crp-invert: INVERT concept labels for the channels of a network, on top of zennit and zennit-crp.

Public names are imported lazily (PEP 562), so that ``import crp_invert`` does no work and does
not import CRP, h5py or matplotlib until a name that needs them is used.
"""
import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # core: plain tensors, no model needed
    "Formula": "core.formula",
    "ConceptLabels": "core.concepts",
    "SearchParams": "core.params",
    "LayerLabels": "core.labels",
    "Explanation": "core.labels",
    "ReliabilityRule": "core.labels",
    "NO_RELIABLE_LABEL": "core.labels",
    "beam_search": "core.search",
    "SearchMemory": "core.search",
    # the labeler over arrays, cache files and torchrun
    "ConceptLabeler": "labeler",
    "label_cache": "labeler",
    "label_h5": "labeler",
    # storage
    "ActivationCache": "storage.cache",
    "FlatActivationWriter": "storage.flat",
    "FileInUseError": "storage.lock",
    # CRP integration
    "InvertFeatureVisualization": "integration.feature_visualization",
    "record_activations": "integration.hooks",
    "decompose": "integration.glocal",
    "GlocalExplanation": "integration.glocal",
    "decompose_batch": "integration.glocal",
    "channel_relevances": "integration.glocal",
    "Evidence": "integration.glocal",
    "ChannelEvidence": "integration.glocal",
    "circuit_by_weight": "integration.circuits",
    "circuit_by_relevance": "integration.circuits",
    "concept_circuit": "integration.circuits",
    "Circuit": "integration.circuits",
    # concept search and the Clever-Hans audit (the function is crp_invert.audit.audit)
    "find_channels": "find",
    "ChannelSearch": "find",
    "Audit": "audit",
    # on top
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

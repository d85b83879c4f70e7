"""Recording into an activation cache, the two ways in one place (kept for ``from
crp_invert.integration.recording import ...``):

:class:`InvertFeatureVisualization` (:mod:`.feature_visualization`)
    A drop-in subclass of CRP's ``FeatureVisualization``: the ``run`` that computes CRP's ActMax/RelMax
    reference samples also writes, for every sample and every layer of ``layer_map``, the pooled activation and
    the relevance of each concept. No extra forward or backward pass; CRP's own results are unchanged.
:func:`record_activations` (:mod:`.hooks`)
    Plain forward hooks over a DataLoader, for users who only want labels.

Importing this module imports CRP's visualization stack; ``crp_invert.record_activations`` does not.
"""

from .feature_visualization import InvertFeatureVisualization, load_stat_targets
from .hooks import record_activations
from .recorder import pool

__all__ = ["InvertFeatureVisualization", "record_activations", "pool", "load_stat_targets"]

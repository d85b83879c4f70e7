"""Layer 3, the CRP / zennit integration: the only package that imports crp and zennit. Recording
during CRP's ``FeatureVisualization.run`` into an activation cache, glocal decompositions of class
heatmaps with ``CondAttribution``, and labeled circuits.

Modules: ``recording``, ``glocal``, ``circuits``.
"""

"""Layer 1, the core: INVERT on plain tensors. Metrics (midranks, exact AUC, Mann-Whitney), formulas,
concept labels, the vectorized beam search, the labels it produces, the search parameters, and the pure
labeling of an [N, F] array. Imports nothing of ours outside ``core``, and no crp, zennit or h5py.

Modules: ``checks``, ``params``, ``metrics``, ``formula``, ``concepts``, ``search``, ``labels``, ``labeling``.
"""

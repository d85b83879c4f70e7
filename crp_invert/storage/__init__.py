"""Layer 2, storage: the HDF5 activation cache (one writer of its layout), the flat ``Y`` format of the
INVERT release, fingerprints of what produced the data, and opening files for labeling with every check
made first. Imports ``core`` and h5py.

Modules: ``h5``, ``fingerprint``, ``cache``, ``flat``.
"""

"""Layer 3, scale-out with torchrun: the process group, shard files and their index, sharded recording
and channel-parallel labeling. Uses ``storage`` and ``core`` through their public functions; knows nothing
of crp or zennit (the recording object is passed in).

Modules: ``group``, ``shards``, ``recording``, ``labeling``.
"""

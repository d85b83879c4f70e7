"""The kinds of files CRP's ``FeatureVisualization`` writes per checkpoint, named once for every layer that
handles them (the checkpoint log of the integration, the sharded recording)."""

__all__ = ["CRP_KINDS"]

#: RelMax, ActMax, relevance statistics, activation statistics - the keys of CRP's ``run`` result.
CRP_KINDS = ("r_max", "a_max", "r_stats", "a_stats")

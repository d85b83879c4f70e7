"""The one definition of the beam search's parameters (:class:`SearchParams`), checked once and used by
every entry point: :meth:`ConceptLabeler.label`, :func:`~crp_invert.core.labeling.label_array` and the CLI's
options (built from the fields' metadata). Imports only numpy, so that the CLI stays light."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checks import check_fraction, check_int

__all__ = ["SearchParams", "MODES"]

MODES = ("positive", "negative")


@dataclass(frozen=True)
class SearchParams:
    """The parameters of INVERT's beam search, checked once.

    Every entry point (:meth:`ConceptLabeler.label`, :func:`label_array`, the CLI's options) builds
    one of these; the field metadata holds the help text the CLI shows.

    ``min_support`` bounds the counts inside the search, like the fractions: a formula must hold on at
    least ``min_support`` samples and fail on at least as many, so that formulas which can never be
    reliable (:class:`~crp_invert.core.labels.ReliabilityRule`) do not push reliable ones out of the beam.
    ``min_support=0`` is the paper's search (results bit-identical to versions without this field).
    """

    L: int = field(default=3, metadata={"help": "maximal formula length (number of concepts)"})
    B: int = field(default=3, metadata={"help": "beam width; explanations kept per channel"})
    limit_search: int | None = field(
        default=None, metadata={"help": "use only the N concepts or negations with the largest |AUC - 0.5|"})
    min_fraction: float = field(default=0.0, metadata={"help": "smallest share of samples a formula may cover"})
    max_fraction: float = field(default=0.5, metadata={"help": "largest share of samples a formula may cover"})
    mode: str = field(default="positive", metadata={"help": "maximize (positive) or minimize (negative) the AUC"})
    min_support: int = field(
        default=10, metadata={"help": "samples a formula must hold on, and fail on, at least (0: the paper's search)"})
    memorize_states: bool = field(default=False, metadata={"help": "keep the beam after every length"})
    feature_batch_size: int | None = field(
        default=None, metadata={"help": "channels searched together (default: from free memory)"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "L", check_int(self.L, "L"))
        object.__setattr__(self, "B", check_int(self.B, "B"))
        if self.limit_search is not None:
            object.__setattr__(self, "limit_search", check_int(self.limit_search, "limit_search"))
        object.__setattr__(self, "min_fraction", check_fraction(self.min_fraction, "min_fraction"))
        object.__setattr__(self, "max_fraction", check_fraction(self.max_fraction, "max_fraction"))
        if self.min_fraction > self.max_fraction:
            raise ValueError(
                f"min_fraction ({self.min_fraction}) must not exceed max_fraction ({self.max_fraction})")
        object.__setattr__(self, "min_support", check_int(self.min_support, "min_support", minimum=0))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.memorize_states, bool):
            raise TypeError(f"memorize_states must be a bool, got {type(self.memorize_states).__name__}")
        if self.feature_batch_size is not None:
            object.__setattr__(self, "feature_batch_size", check_int(self.feature_batch_size, "feature_batch_size"))

    def search_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`crp_invert.core.search.beam_search`."""
        return dict(L=self.L, B=self.B, limit_search=self.limit_search, min_fraction=self.min_fraction,
                    max_fraction=self.max_fraction, mode=self.mode, memorize_states=self.memorize_states,
                    min_support=self.min_support)

    def to_dict(self) -> dict[str, Any]:
        """The parameters stored with :class:`LayerLabels` (feature batch and states do not change results)."""
        return dict(L=self.L, B=self.B, limit_search=self.limit_search, min_fraction=self.min_fraction,
                    max_fraction=self.max_fraction, mode=self.mode, min_support=self.min_support)

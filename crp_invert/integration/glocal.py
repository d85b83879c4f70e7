"""Glocal explanations: a class heatmap decomposed into labeled per-channel heatmaps.

A local explanation (the heatmap of one prediction) is the sum of the conditional heatmaps of the
channels of an earlier layer (CRP). Each channel part carries a global INVERT label, which turns the
heatmap into "recognized through channel 296 = box and channel 154 = Chinese text" (paper section 5.2).

A label is a claim about the labeling data, so a part shows only a *reliable* explanation of its channel
(:py:mod:`crp_invert.integration.shown_labels`), and with :py:class:`Evidence` (the sample's concepts and
the activation cache the labels came from) one that *holds on this sample*, or says that none does, with
the evidence: the sample's activation percentile among the labeling data, holds or fails. Where relevance
labels were recorded too (``relevance_labels=``), a part shows the source that describes the channel
better, and says which (``"act"`` or ``"rel"``).

All conditional heatmaps come from CRP's :py:class:`crp.attribution.CondAttribution`, with several
conditions per backward pass. Every module name works as a layer: leaves, containers (``"layer4"``, whose
output is the layer) and modules called several times per forward pass (their last call; see
:py:func:`decompose_batch`). The model is left as it was (:py:func:`~crp_invert.integration.guard.model_guard`):
hooks that CRP would leave attached and canonizer changes that zennit would leave behind after an error are
undone. The circuits live in :py:mod:`crp_invert.integration.circuits`.
"""
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from ..core.checks import is_int
from ..core.jsonio import read_json, write_json
from .evidence import ChannelEvidence, Evidence, check_concept_names, collect_evidence, sample_concepts
from .guard import model_guard
from .layers import (
    LastCall,
    channel_count,
    check_rank_by,
    check_top_k,
    get_module,
    prepare,
    probe,
    rank_channels,
)
from .shown_labels import (
    NO_RELIABLE_LABEL,
    NONE_HOLDS,
    SOURCES,
    LabelChoice,
    checked_layer_labels,
    choose_label,
    reliable_explanations,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GlocalExplanation",
    "Evidence",
    "ChannelEvidence",
    "decompose",
    "decompose_batch",
    "channel_relevances",
]


def _as_targets(target, n_samples: int, n_outputs: int, prediction: torch.Tensor) -> list[int]:
    if target is None:
        return prediction.argmax(dim=1).tolist()
    if isinstance(target, torch.Tensor):
        target = target.tolist()
    elif isinstance(target, np.ndarray):
        target = target.tolist()
    if is_int(target):
        targets = [int(target)] * n_samples
    elif isinstance(target, Sequence) and not isinstance(target, str):
        targets = list(target)
        if len(targets) != n_samples:
            raise ValueError(f"got {len(targets)} targets for {n_samples} samples")
    else:
        raise TypeError(f"target must be an int, a sequence of ints or None, got {type(target).__name__}")
    for value in targets:
        if not is_int(value):
            raise TypeError(f"targets must be ints, got {value!r}")
        if not 0 <= value < n_outputs:
            raise ValueError(f"target {value} is out of range: the model has {n_outputs} outputs "
                             f"(expected 0 <= target < {n_outputs})")
    return [int(value) for value in targets]


def _attribute(attribution, data: torch.Tensor, conditions: list[dict[str, list[int]]], composite, layer,
               record: bool, exclude_parallel: bool, batch_size: int, progress: bool = False,
               mask_map=None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run CondAttribution on row i of ``data`` with ``conditions[i]``, in chunks of ``batch_size`` rows.

    Returns the heatmaps [R, ...] and, when ``record``, the relevance and the activation of ``layer``
    [R, C, ...] (else None twice). ``mask_map`` is CRP's (default: ``ChannelConcept.mask``).
    """
    heatmaps, relevances, activations = [], [], []
    n_rows = len(conditions)
    chunks = range(0, n_rows, batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, total=math.ceil(n_rows / batch_size), desc="conditional heatmaps")
    extra = {} if mask_map is None else {"mask_map": mask_map}
    for start in chunks:
        rows = data[start:start + batch_size].detach().clone().requires_grad_(True)
        result = attribution(rows, conditions[start:start + batch_size], composite,
                             record_layer=[layer] if record else [], exclude_parallel=exclude_parallel, **extra)
        heatmaps.append(result.heatmap.detach())
        if record:
            relevances.append(result.relevances[layer].detach())
            activations.append(result.activations[layer].detach())
    heatmap = torch.cat(heatmaps, dim=0)
    if not record:
        return heatmap, None, None
    return heatmap, torch.cat(relevances, dim=0), torch.cat(activations, dim=0)


# ------------------------------------------------------------------------------------------------
# decomposition
# ------------------------------------------------------------------------------------------------

_TENSOR_FIELDS = ("heatmap", "channels", "channel_heatmaps", "relevance", "share", "rest_heatmap",
                  "channel_relevance", "prediction")


def _tensor_to_json(tensor: torch.Tensor) -> dict[str, Any]:
    tensor = tensor.detach().cpu()
    return {"dtype": str(tensor.dtype).replace("torch.", ""), "shape": list(tensor.shape),
            "values": tensor.reshape(-1).tolist()}


def _tensor_from_json(data: Mapping[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, str(data["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {data['dtype']!r} in glocal JSON")
    return torch.tensor(data["values"], dtype=dtype).reshape(data["shape"])


@dataclass(frozen=True, eq=False)
class GlocalExplanation:
    """The heatmap of one prediction split into the labeled conditional heatmaps of a layer's channels.

    Attributes
    ----------
    layer : str
        The layer whose channels decompose the heatmap. For a module called several times in one forward
        pass, its last call (see :py:func:`decompose_batch`).
    target : int
        The output (class) explained.
    heatmap : torch.Tensor
        The class heatmap, CondAttribution with ``{"y": [target]}``, shape of the input without batch and
        color dimension ([H, W] for images).
    channels : torch.Tensor
        The ``top_k`` channels (long) ranked by relevance, most relevant first.
    channel_heatmaps : torch.Tensor
        [top_k, H, W], CondAttribution with ``{"y": [target], layer: [c]}`` for each channel.
    relevance : torch.Tensor
        [top_k] relevance of each channel, ``ChannelConcept().attribute(R, abs_norm=False)``.
    share : torch.Tensor
        [top_k] the channel's relevance divided by the layer total (:py:attr:`total_relevance`; zero if
        the total is zero). Signed: shares of all channels sum to one.
    labels : tuple
        The :py:class:`~crp_invert.Explanation` each part shows, or None ("no reliable label", or with
        evidence "no reliable label holds here"): a reliable explanation of the channel, with evidence one
        that holds on this sample (:py:func:`~crp_invert.integration.shown_labels.choose_label`).
    rest_heatmap : torch.Tensor
        Heatmap of everything except the ``top_k`` channels: one conditional pass with the complement
        channel set, without excluding parallel paths, so it also holds relevance that bypasses the layer
        (skip connections). ``channel_heatmaps.sum(0) + rest_heatmap == heatmap`` always.
    channel_relevance : torch.Tensor
        [C] relevance of every channel of the layer.
    prediction : torch.Tensor
        [n_outputs] the model output for the sample.
    rank_by : str
        "signed" or "absolute": how the channels were ranked.
    evidence : tuple of ChannelEvidence or None
        Per channel part (same order as ``channels``): the sample's activation percentile and whether the
        label holds (:py:class:`Evidence`); None when decomposed without ``evidence=``.
    label_sources : tuple of str or None, or None
        Per part, where its label comes from: ``"act"`` (activation labels, ``labels=``), ``"rel"``
        (relevance labels, ``relevance_labels=``) or None (nothing shown). None: all ``"act"`` (explanations
        made before the sources existed).
    """

    layer: str
    target: int
    heatmap: torch.Tensor
    channels: torch.Tensor
    channel_heatmaps: torch.Tensor
    relevance: torch.Tensor
    share: torch.Tensor
    labels: tuple[Any, ...]
    rest_heatmap: torch.Tensor
    channel_relevance: torch.Tensor
    prediction: torch.Tensor
    rank_by: str = "signed"
    evidence: tuple[ChannelEvidence, ...] | None = None
    label_sources: tuple[str | None, ...] | None = None

    @property
    def top_k(self) -> int:
        """Number of channels decomposed."""
        return int(self.channels.numel())

    @property
    def total_relevance(self) -> float:
        """Sum of the relevance of all channels of the layer."""
        return float(self.channel_relevance.sum())

    def completeness_error(self) -> float:
        """Relative error ``|sum(channel_heatmaps) + rest - heatmap| / |heatmap|`` (Frobenius norms)."""
        total = self.channel_heatmaps.double().sum(0) + self.rest_heatmap.double()
        reference = self.heatmap.double()
        norm = float(reference.norm())
        return float((total - reference).norm()) / (norm if norm > 0 else 1.0)

    def label_strings(self) -> list[str | None]:
        """The formula of each part's shown label as text (None where nothing is shown)."""
        return [None if label is None else str(label.formula) for label in self.labels]

    def sources(self) -> list[str | None]:
        """Per part, the source of its shown label: ``"act"``, ``"rel"`` or None (nothing shown)."""
        if self.label_sources is not None:
            return list(self.label_sources)
        return [None if label is None else "act" for label in self.labels]

    def shown_texts(self) -> list[str]:
        """What each part's title says: the formula, "no reliable label holds here" (evidence: none of the
        channel's reliable labels holds on the sample) or "no reliable label".
        """
        texts = []
        for i, label in enumerate(self.labels):
            part = self.evidence[i] if self.evidence is not None else None
            holds = getattr(part, "label_holds", None)
            texts.append(str(label.formula) if label is not None else
                         NONE_HOLDS if holds is False else NO_RELIABLE_LABEL)
        return texts

    def unexplained(self) -> list[int]:
        """Channels whose label does not hold for this sample while their activation is low (needs evidence)."""
        return [part.channel for part in self.evidence or () if part.unexplained]

    def to(self, device) -> "GlocalExplanation":
        """A copy with all tensors on ``device``."""
        values = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
                  for name, value in self.__dict__.items()}
        return GlocalExplanation(**values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: tensors as ``{"dtype", "shape", "values"}``, labels as Explanation JSON, the
        evidence as a list of :py:meth:`ChannelEvidence.to_dict` (or None)."""
        data: dict[str, Any] = {"layer": self.layer, "target": int(self.target), "rank_by": self.rank_by}
        for name in _TENSOR_FIELDS:
            data[name] = _tensor_to_json(getattr(self, name))
        data["labels"] = [None if label is None else label.to_json() for label in self.labels]
        data["label_sources"] = self.sources()
        data["shown"] = self.shown_texts()  # for readers of the JSON; ignored by from_dict
        data["evidence"] = None if self.evidence is None else [part.to_dict() for part in self.evidence]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GlocalExplanation":
        """Rebuild from :py:meth:`to_dict` output (TypeError, KeyError or ValueError for anything else)."""
        from ..core.labels import Explanation

        if not isinstance(data, Mapping):
            raise TypeError(f"a GlocalExplanation document must be a JSON object, got {type(data).__name__}")
        evidence, sources = data.get("evidence"), data.get("label_sources")
        if sources is not None and (not isinstance(sources, list)
                                    or any(source not in SOURCES + (None,) for source in sources)):
            raise ValueError(f"label_sources must be {SOURCES} or null, got {sources!r}")
        try:
            return cls(layer=data["layer"], target=int(data["target"]), rank_by=data.get("rank_by", "signed"),
                       labels=tuple(None if label is None else Explanation.from_json(label)
                                    for label in data["labels"]),
                       evidence=None if evidence is None else tuple(ChannelEvidence.from_dict(e) for e in evidence),
                       label_sources=None if sources is None else tuple(sources),
                       **{name: _tensor_from_json(data[name]) for name in _TENSOR_FIELDS})
        except (AttributeError, IndexError, OverflowError, RuntimeError) as error:  # a damaged document
            raise ValueError(f"not a GlocalExplanation document: {type(error).__name__}: {error}") from None

    def to_json(self, path=None) -> str:
        """The explanation as JSON text; also written to ``path`` when given."""
        return write_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, text_or_path) -> "GlocalExplanation":
        """Read an explanation from JSON text or from a file path."""
        return cls.from_dict(read_json(text_or_path))

    def _repr_html_(self) -> str:
        from ..core.html import html_table
        return html_table(["channel", "share", "relevance", "label"], zip(self.channels.tolist(), self.share.tolist(),
                          self.relevance.tolist(), self.label_strings()), f"class {self.target} in {self.layer}")


def decompose_batch(attribution, samples: torch.Tensor, target, layer: str, composite, labels=None,
                    top_k: int = 8, rank_by: str = "signed", batch_size: int = 32, device=None,
                    progress: bool = False, evidence: Evidence | None = None,
                    relevance_labels=None) -> list[GlocalExplanation]:
    """Decompose the heatmaps of a batch of samples into the conditional heatmaps of ``layer``'s channels.

    Each sample gets its own top channels. All conditional heatmaps (``top_k`` per sample, plus one
    rest heatmap) are computed with several conditions per backward pass (``batch_size`` rows each).

    ``layer`` is any module name, a leaf (``"layer4.1.conv2"``) or a container (``"layer4"``, its output).
    A module called several times in one forward pass (ResNet's BasicBlock applies its ``relu`` after
    ``bn1`` and again after the residual sum) stands for its *last* call's output: the tensor CRP records
    for it (``record_layer``: activations and relevances, which rank the channels) and the one an
    activation cache holds. CRP's own mask hook would mask that channel index in the output of every
    call, mixing two unrelated tensors, and the parts would not add up to the class heatmap; here only
    the last call is masked, so the parts add up, and each channel heatmap equals CondAttribution's on a
    module whose output is that tensor (for BasicBlock's ``relu``: the block). For modules called once
    everything is CondAttribution's, unchanged.

    Parameters
    ----------
    attribution : crp.attribution.CondAttribution
        CRP's attribution object over the model.
    samples : torch.Tensor
        [B, ...] input batch.
    target : int, sequence of int or None
        The output explained, one for all samples or one per sample; None takes the predicted class.
    layer : str
        Name of the layer whose channels decompose the heatmap (a module name of the model).
    composite : zennit.core.Composite
        LRP composite (with canonizers) used by CRP.
    labels : LayerLabels, mapping of layer name to LayerLabels, or None
        INVERT labels of the layer (searched on activations); each part shows a reliable explanation of its
        channel: the best one, or with ``evidence`` the best one that holds on the sample.
    top_k : int
        Number of channels, 1 <= top_k <= number of channels of the layer.
    rank_by : {"signed", "absolute"}
        Rank channels by their signed relevance (default) or by its absolute value.
    batch_size : int
        Rows (sample, condition) per forward/backward pass.
    device : torch.device or str, optional
        Where to compute; default: the attribution's device.
    progress : bool
        Show a tqdm progress bar over the passes.
    evidence : Evidence, optional
        Choose each part's label per sample (among the channel's reliable ones, one that holds on the
        sample's concepts) and attach the evidence: the sample's activation percentile among the labeling
        data and whether a reliable label holds (``sample_index``/``concept_row`` one per sample).
    relevance_labels : LayerLabels, mapping of layer name to LayerLabels, or None
        Labels of the layer searched on relevances (``label_cache(..., source="relevance")``). Where one
        describes a part better (holds on the sample, higher AUC), the part shows it, marked ``"rel"``.

    Returns
    -------
    list of GlocalExplanation
        One per sample, in order; tensors on ``device``.

    Raises
    ------
    KeyError
        ``layer`` is not a module of the model, or ``labels`` is a mapping without ``layer``.
    ValueError
        a target out of range, ``top_k`` out of range, labels with another channel count or layer,
        an unknown ``rank_by``, evidence that does not fit the samples.

    Notes
    -----
    The model is left as it was, also when a call fails: no hooks, no canonizer changes.
    zennit 0.4.6's ``SequentialMergeBatchNorm`` (``VGGCanonizer``'s, ``ResNetCanonizer``'s part) fails on
    torchvision's DenseNets: it pairs each dense layer's ``conv2`` with the next layer's ``norm1``, which
    normalizes the concatenation of all earlier features. Plain CRP fails the same way and leaves the batch
    norms merged before the failure changed (here they are restored). Merge only the pairs that are
    sequential, ``NamedMergeBatchNorm([(("features.conv0",), "features.norm0")] + [((f"{name}.conv1",),
    f"{name}.norm2") for each dense layer name])``, or use no canonizer.
    """
    rank_by = check_rank_by(rank_by)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if evidence is not None and not isinstance(evidence, Evidence):
        raise TypeError(f"evidence must be an Evidence, got {type(evidence).__name__}")
    model = attribution.model
    get_module(model, layer)
    device = attribution.device if device is None else torch.device(device)
    data = prepare(samples, device)
    if data.dim() < 2:
        raise ValueError(f"samples must have a batch dimension, got shape {tuple(data.shape)}")
    found = probe(model, data, [layer])
    n_channels = channel_count(found.shapes, layer)
    targets = _as_targets(target, data.shape[0], found.prediction.shape[1], found.prediction)
    top_k = check_top_k(top_k, n_channels, layer)
    sources = {"act": checked_layer_labels(labels, layer, n_channels),
               "rel": checked_layer_labels(relevance_labels, layer, n_channels)}
    rows, indices = sample_concepts(evidence, len(data)) if evidence is not None else ([None] * len(data), None)
    check_concept_names(rows, list(sources.values()))
    last_call = LastCall(model, [layer] if found.calls[layer] > 1 else [])
    run = _Run(attribution, composite, layer, batch_size, last_call.mask)
    with model_guard(model), last_call.attached():
        passes = _conditional_heatmaps(run, data, targets, top_k, rank_by, n_channels, progress)
    memos = [{} for _ in range(len(data))]  # per sample: whether each formula holds, evaluated once
    choices = [[choose_label(_candidates(sources, c), rows[i], memos[i]) for c in passes.order[i].tolist()]
               for i in range(len(data))]
    parts_evidence = [None] * len(data)
    if evidence is not None:
        parts_evidence = collect_evidence(evidence, layer, passes.activation, passes.order, choices, indices)
    return [_explanation(passes, i, layer, targets[i], found.prediction[i], rank_by, choices[i], parts_evidence[i])
            for i in range(len(data))]


class _Run(NamedTuple):
    """What every CondAttribution call of one decomposition shares."""

    attribution: Any
    composite: Any
    layer: str
    batch_size: int
    mask_map: Any


class _Passes(NamedTuple):
    """The results of a decomposition's three kinds of passes, per sample (see :func:`decompose_batch`)."""

    heatmaps: torch.Tensor  # [B, ...] class heatmaps
    channel_relevance: torch.Tensor  # [B, C]
    activation: torch.Tensor  # [B, C, ...] the layer output
    order: torch.Tensor  # [B, top_k] each sample's top channels
    channel_heatmaps: torch.Tensor  # [B, top_k, ...]
    rest_heatmaps: torch.Tensor  # [B, ...]


def _conditional_heatmaps(run: _Run, data: torch.Tensor, targets: list[int], top_k: int, rank_by: str,
                          n_channels: int, progress: bool) -> _Passes:
    """The class heatmaps (ranking the channels), one heatmap per top channel, and the rest's heatmap."""
    from crp.concepts import ChannelConcept

    def attribute(rows, conditions, record=False, exclude_parallel=True, show=False):
        return _attribute(run.attribution, rows, conditions, run.composite, run.layer, record=record,
                          exclude_parallel=exclude_parallel, batch_size=run.batch_size, progress=show,
                          mask_map=run.mask_map)

    n_samples, layer = len(data), run.layer
    heatmaps, relevance, activation = attribute(data, [{"y": [t]} for t in targets], record=True)
    channel_rel = ChannelConcept().attribute(relevance, abs_norm=False)  # [B, C]
    order = rank_channels(channel_rel, rank_by)[:, :top_k]  # [B, top_k]
    # one row per (sample, top channel)
    conditions = [{"y": [targets[i]], layer: [int(c)]} for i in range(n_samples) for c in order[i].tolist()]
    channel_heatmaps, _, _ = attribute(data.repeat_interleave(top_k, dim=0), conditions, show=progress)
    channel_heatmaps = channel_heatmaps.reshape(n_samples, top_k, *channel_heatmaps.shape[1:])
    # the rest: complement channels plus whatever bypasses the layer (not excluding parallel paths)
    rest_conditions = []
    for i in range(n_samples):
        chosen = set(order[i].tolist())
        rest_conditions.append({"y": [targets[i]], layer: [c for c in range(n_channels) if c not in chosen]})
    rest_heatmaps, _, _ = attribute(data, rest_conditions, exclude_parallel=False)
    return _Passes(heatmaps, channel_rel, activation, order, channel_heatmaps, rest_heatmaps)


def _candidates(sources: Mapping[str, Any], channel: int) -> dict[str, list[Any]]:
    """The reliable explanations of ``channel`` per label source (best first)."""
    return {source: reliable_explanations(labels, channel) for source, labels in sources.items()}


def _explanation(passes: _Passes, i: int, layer: str, target: int, prediction: torch.Tensor, rank_by: str,
                 choices: Sequence[LabelChoice], evidence) -> GlocalExplanation:
    """Sample ``i``'s GlocalExplanation from the passes and the chosen labels of its parts."""
    total = passes.channel_relevance[i].sum()
    relevance = passes.channel_relevance[i, passes.order[i]]
    share = relevance / total if total != 0 else torch.zeros_like(relevance)
    return GlocalExplanation(
        layer=layer, target=target, heatmap=passes.heatmaps[i], channels=passes.order[i].clone(),
        channel_heatmaps=passes.channel_heatmaps[i], relevance=relevance, share=share,
        labels=tuple(choice.explanation for choice in choices), rest_heatmap=passes.rest_heatmaps[i],
        channel_relevance=passes.channel_relevance[i], prediction=prediction.detach(), rank_by=rank_by,
        evidence=evidence, label_sources=tuple(choice.source for choice in choices))


def decompose(attribution, sample: torch.Tensor, target, layer: str, composite, labels=None, top_k: int = 8,
              rank_by: str = "signed", batch_size: int = 32, device=None,
              progress: bool = False, evidence: Evidence | None = None,
              relevance_labels=None) -> GlocalExplanation:
    """Decompose the heatmap of one sample into the labeled conditional heatmaps of ``layer``'s channels.

    ``channel_heatmaps`` has shape [top_k, H, W]; for a batch of samples use :py:func:`decompose_batch`,
    which returns one :py:class:`GlocalExplanation` per sample.

    Parameters
    ----------
    attribution : crp.attribution.CondAttribution
    sample : torch.Tensor
        One input of shape [1, ...] (CRP's convention).
    target : int or None
        The output explained; None takes the predicted class.
    layer, composite, labels, top_k, rank_by, batch_size, device, progress
        As in :py:func:`decompose_batch` (``layer`` may be a container or a module called twice).
    evidence : Evidence, optional
        Check each channel part against the labeling data: show the channel's reliable label that holds on
        the sample (or say none does), with the sample's activation percentile (``GlocalExplanation.evidence``).
    relevance_labels : LayerLabels or mapping, optional
        Labels searched on relevances, competing with ``labels`` per part (see :py:func:`decompose_batch`).

    Returns
    -------
    GlocalExplanation

    Examples
    --------
    >>> g = decompose(attribution, sample, target, layer="features.40", composite=composite,
    ...               labels=layer_labels, top_k=8)   # doctest: +SKIP
    >>> g.channel_heatmaps.shape                      # doctest: +SKIP
    torch.Size([8, 224, 224])

    With evidence from the activation cache the labels were computed from (the sample is item 17 of the
    labeled dataset):

    >>> g = decompose(attribution, sample, target, "features.40", composite, labels=layer_labels,
    ...               evidence=Evidence(cache, concepts=concepts, sample_index=17))  # doctest: +SKIP
    >>> g.unexplained()                               # doctest: +SKIP
    [301]
    """
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    if sample.dim() < 2 or sample.shape[0] != 1:
        raise ValueError(f"decompose explains one sample of shape [1, ...] (CRP's convention), got shape "
                         f"{tuple(sample.shape)}; use decompose_batch for a batch, or sample.unsqueeze(0)")
    if isinstance(target, (Sequence, torch.Tensor, np.ndarray)) and not isinstance(target, str):
        raise TypeError("decompose takes one int target (or None); use decompose_batch for several")
    return decompose_batch(attribution, sample, target, layer, composite, labels=labels, top_k=top_k,
                           rank_by=rank_by, batch_size=batch_size, device=device, progress=progress,
                           evidence=evidence, relevance_labels=relevance_labels)[0]


def channel_relevances(attribution, data, target, layer: str, composite, batch_size: int = 32,
                       device=None, progress: bool = False) -> torch.Tensor:
    """Per-channel relevance of ``layer`` for each sample, ``ChannelConcept.attribute(R, abs_norm=False)``.

    Parameters
    ----------
    attribution : crp.attribution.CondAttribution
    data : torch.Tensor or iterable
        [N, ...] inputs, or an iterable of batches (tensors or ``(input, target, ...)`` tuples).
    target : int, sequence of int or None
        The output the relevance is computed for (one for all, one per sample, or None for the
        predicted class).
    layer, composite, batch_size, device, progress
        As in :py:func:`decompose_batch`. For a module called several times per forward pass: the
        relevance of its last call, as CRP records it.

    Returns
    -------
    torch.Tensor
        [N, C] on the CPU.
    """
    from crp.concepts import ChannelConcept

    model = attribution.model
    get_module(model, layer)
    device = attribution.device if device is None else torch.device(device)
    batches = [data] if isinstance(data, torch.Tensor) else data
    if isinstance(target, (torch.Tensor, np.ndarray)):
        target = target.tolist()
    results, offset = [], 0
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        batch = prepare(batch, device)
        prediction = probe(model, batch, [layer]).prediction
        if isinstance(target, Sequence) and not isinstance(target, str):
            batch_target = list(target[offset:offset + len(batch)])
        else:
            batch_target = target
        targets = _as_targets(batch_target, len(batch), prediction.shape[1], prediction)
        with model_guard(model):
            _, rel, _ = _attribute(attribution, batch, [{"y": [t]} for t in targets], composite, layer,
                                   record=True, exclude_parallel=True, batch_size=batch_size, progress=progress)
        results.append(ChannelConcept().attribute(rel, abs_norm=False).cpu())
        offset += len(batch)
    if not results:
        raise ValueError("data holds no samples")
    return torch.cat(results, dim=0)

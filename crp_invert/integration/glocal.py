"""Glocal explanations: a class heatmap decomposed into labeled per-channel heatmaps.

A local explanation (the heatmap of one prediction) is the sum of the conditional heatmaps of the
channels of an earlier layer (CRP). Each channel carries its global INVERT label, which turns the
heatmap into "recognized through channel 296 = box and channel 154 = Chinese text" (paper
section 5.2). The circuits (paper figure 7 and appendix A.8) name the channels that matter most for
a class logit, by direct weight, by mean relevance over a dataset, or by following CRP's
:py:class:`crp.attribution.AttributionGraph` down from one labeled concept.

All conditional heatmaps come from CRP's :py:class:`crp.attribution.CondAttribution`, with several
conditions per backward pass. Every module name works as a layer: leaves, containers (``"layer4"``, whose
output is the layer) and modules called several times per forward pass (their last call; see
:py:func:`decompose_batch`). Each channel part can carry its evidence on the sample
(:py:class:`Evidence`): the sample's activation percentile among the labeling data and whether the
channel's label holds for it. Hooks that CRP would leave attached and canonizer changes that zennit would
leave behind after an error are undone.
"""
import contextlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from ..core.checks import is_int
from ..core.jsonio import read_json as _read_json
from ..core.jsonio import write_json as _write_json
from ..storage.cache import ActivationCache

logger = logging.getLogger(__name__)

__all__ = [
    "GlocalExplanation",
    "Evidence",
    "ChannelEvidence",
    "decompose",
    "decompose_batch",
    "channel_relevances",
]

RANK_BY = ("signed", "absolute")


# ------------------------------------------------------------------------------------------------
# helpers: hooks, validation
# ------------------------------------------------------------------------------------------------

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_HOOK_EXTRAS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def _drop_new_hooks(module: torch.nn.Module, known: dict[str, set]) -> None:
    for name in _HOOK_DICTS:
        hooks = getattr(module, name, None)
        if not hooks:
            continue
        for key in [key for key in hooks if key not in known[name]]:
            hooks.pop(key, None)
            for extra in _HOOK_EXTRAS:
                getattr(module, extra, {}).pop(key, None)


def _tensor_state(module: torch.nn.Module) -> dict[str, Any]:
    """The parameter and buffer objects of a module and the storage their ``.data`` points to."""
    state = {}
    for kind in ("_parameters", "_buffers"):
        for name, value in getattr(module, kind).items():
            state[(kind, name)] = (value, None if value is None else value.data)
    return state


def _restore_tensors(module: torch.nn.Module, saved: dict[str, Any]) -> None:
    for kind in ("_parameters", "_buffers"):
        table = getattr(module, kind)
        for name in [name for name in table if (kind, name) not in saved]:
            del table[name]
    for (kind, name), (value, data) in saved.items():
        table = getattr(module, kind)
        if table.get(name) is not value:
            table[name] = value
        if value is not None and (value.data_ptr() != data.data_ptr() or value.shape != data.shape
                                  or value.stride() != data.stride()):
            value.data = data


@contextlib.contextmanager
def _guard_model(model: torch.nn.Module):
    """Leave the model as it was on exit, also after an error: no new hooks, no canonizer changes.

    CRP's ``CondAttribution`` removes its recording hooks only when a pass succeeds, and zennit's
    canonizers are undone only by the context that applied them: a canonizer that fails half way
    (``SequentialMergeBatchNorm`` on DenseNet) leaves the batch norms it already merged, and an error
    inside ``AttributionGraph`` leaves CRP's ``generate`` suspended inside its composite context. On exit
    this context drops every module hook registered inside it, and restores each module's attributes,
    children, parameters, buffers and the tensors their ``.data`` points to (zennit's canonizers change
    exactly these; a canonizer that wrote into a tensor in place would not be undone).
    """
    modules = list(model.modules())
    hooks = [{name: set(getattr(module, name, {}).keys()) for name in _HOOK_DICTS} for module in modules]
    attributes = [dict(vars(module)) for module in modules]
    children = [dict(module._modules) for module in modules]
    tensors = [_tensor_state(module) for module in modules]
    try:
        yield
    finally:
        for module, known, attrs, kids, saved in zip(modules, hooks, attributes, children, tensors):
            _drop_new_hooks(module, known)
            for name in [name for name in vars(module) if name not in attrs]:
                delattr(module, name)
            for name, value in attrs.items():
                if vars(module).get(name, _MISSING) is not value:
                    object.__setattr__(module, name, value)
            for name in [name for name in module._modules if name not in kids]:
                del module._modules[name]
            module._modules.update((name, kid) for name, kid in kids.items() if module._modules.get(name) is not kid)
            _restore_tensors(module, saved)


_MISSING = object()


class _LastCall:
    """Masks for modules called several times per forward pass that act on the last call only.

    CRP's mask hook registers its gradient mask on the output of every call of a module: a condition on
    ResNet's BasicBlock ``relu`` (applied after ``bn1`` and again after the residual sum) would mask the
    same channel index in two unrelated tensors. CRP records (``record_layer``) the output of the last
    call, so the layer *is* its last call's output: what its activations and relevances describe. While
    attached, forward hooks count each module's calls in every forward pass and tag each call's output
    with a gradient hook that notes which call the gradient arriving there belongs to; the masks made by
    :meth:`mask_map` then mask only the gradient of the last call. For modules called once this is
    CRP's ``ChannelConcept.mask``.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.names = list(names)
        self.calls = {name: 0 for name in self.names}
        self.current = {name: -1 for name in self.names}

    def _reset(self, *_args) -> None:
        for name in self.names:
            self.calls[name] = 0

    def _forward_hook(self, name: str):
        def hook(_module, _inputs, output):
            index = self.calls[name]
            self.calls[name] = index + 1
            if isinstance(output, torch.Tensor) and output.requires_grad:
                def note(grad, index=index):
                    self.current[name] = index
                    return grad

                output.register_hook(note)

        return hook

    @contextlib.contextmanager
    def attached(self):
        """Register the counting hooks (first in line, before CRP's mask hooks) until exit."""
        modules = dict(self.model.named_modules())
        handles = [self.model.register_forward_pre_hook(self._reset)]
        try:
            for name in self.names:
                handles.append(modules[name].register_forward_hook(self._forward_hook(name), prepend=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def is_last(self, name: str) -> bool:
        """Whether the gradient being masked at ``name`` belongs to its last call of the forward pass."""
        return self.current[name] == self.calls[name] - 1

    def mask(self, batch_id: int, concept_ids: list[int], layer_name: str):
        """CRP's ``mask_map`` signature: ``ChannelConcept.mask`` applied to the last call of ``layer_name``."""
        from crp.concepts import ChannelConcept

        channel_mask = ChannelConcept.mask(batch_id, concept_ids, layer_name)
        if layer_name not in self.calls:
            return channel_mask

        def last_call_mask(grad):
            return channel_mask(grad) if self.is_last(layer_name) else grad

        return last_call_mask


def _get_module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules or layer == "":
        names = [name for name in modules if name]
        shown = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "")
        raise KeyError(f"layer {layer!r} is not a module of the model; expected one of: {shown}")
    return modules[layer]


def _check_rank_by(rank_by: str) -> str:
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by={rank_by!r}; expected one of {RANK_BY}")
    return rank_by


def _check_top_k(top_k: int, n_channels: int, layer: str) -> int:
    if not is_int(top_k):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= n_channels:
        raise ValueError(f"top_k={top_k} is out of range: layer {layer!r} has {n_channels} channels "
                         f"(expected 1 <= top_k <= {n_channels})")
    return int(top_k)


def _layer_labels(labels: Any, layer: str, n_channels: int):
    """Return the LayerLabels for ``layer`` (or None), checked against the layer's channel count."""
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        if layer not in labels:
            raise KeyError(f"no labels for layer {layer!r}; labels are given for {sorted(labels)}")
        labels = labels[layer]
    label_layer = getattr(labels, "layer", None)
    if label_layer is not None and label_layer != layer:
        raise ValueError(f"labels are for layer {label_layer!r}, not for layer {layer!r}")
    if len(labels) != n_channels:
        raise ValueError(f"labels have {len(labels)} features but layer {layer!r} has {n_channels} channels; "
                         f"labels of another layer?")
    return labels


def _best_label(labels, channel: int):
    """The best Explanation of ``channel`` in ``labels`` or None."""
    if labels is None:
        return None
    explanations = labels[int(channel)]
    return explanations[0] if len(explanations) else None


def _rank(values: torch.Tensor, rank_by: str) -> torch.Tensor:
    key = values.abs() if rank_by == "absolute" else values
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


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


class _Probe(NamedTuple):
    prediction: torch.Tensor
    shapes: dict[str, tuple[int, ...]]
    calls: dict[str, int]


def _probe(model: torch.nn.Module, data: torch.Tensor, layers: Sequence[str]) -> _Probe:
    """One forward pass without gradients: the model output, the output shape of each layer (its last call)
    and how often each layer is called."""
    modules = {name: _get_module(model, name) for name in layers}
    shapes: dict[str, tuple[int, ...]] = {}
    calls = {name: 0 for name in modules}

    def make_hook(name):
        def hook(_module, _input, output):
            calls[name] += 1
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"layer {name!r} returns a {type(output).__name__}, not a tensor: CRP's "
                                 f"conditions and recordings need a module with one output tensor")
            shapes[name] = tuple(output.shape)

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            prediction = model(data)
    finally:
        for handle in handles:
            handle.remove()
    for name in modules:
        if not calls[name]:
            raise ValueError(f"layer {name!r} was not called in the forward pass of the model")
    if not isinstance(prediction, torch.Tensor) or prediction.dim() != 2:
        raise ValueError(f"the model output must have shape [batch, classes], got "
                         f"{tuple(getattr(prediction, 'shape', ())) or type(prediction).__name__}")
    return _Probe(prediction, shapes, calls)


def _channel_count(shapes: Mapping[str, tuple[int, ...]], layer: str) -> int:
    shape = shapes[layer]
    if len(shape) < 2:
        raise ValueError(f"layer {layer!r} has output shape {shape}; expected [batch, channels, ...]")
    return shape[1]


def _prepare(sample: torch.Tensor, device) -> torch.Tensor:
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    return sample.detach().to(device)


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
# evidence: does the channel's label hold for this sample, how strongly does the channel fire
# ------------------------------------------------------------------------------------------------

LOW_PERCENTILE = 50.0
"""Default threshold of a low activation: below the channel's median over the labeling data."""


@dataclass(frozen=True)
class ChannelEvidence:
    """How one channel part of a glocal explanation relates to the channel's global label, on this sample.

    Attributes
    ----------
    channel : int
        The channel.
    activation : float
        This sample's activation of the channel, pooled as the reference was (e.g. the spatial mean).
    percentile : float
        Where ``activation`` lies among the channel's activations on the labeling data, 0 to 100:
        ``100 * (#below + #equal / 2) / n_reference`` (``scipy.stats.percentileofscore(kind="mean")``).
    n_reference : int
        Number of reference activations (non-finite values, e.g. unrecorded cache rows, are left out).
    label_holds : bool or None
        Whether the channel's label formula holds for this sample (:py:meth:`Formula.evaluate` on the
        sample's concept labels); None where the label or the sample's concepts are unknown.
    low_percentile : float
        The activation counts as low below this percentile (default 50: below the channel's median).
    """

    channel: int
    activation: float
    percentile: float
    n_reference: int
    label_holds: bool | None = None
    low_percentile: float = LOW_PERCENTILE

    @property
    def low(self) -> bool:
        """The activation is below ``low_percentile`` of the channel's reference activations."""
        return self.percentile < self.low_percentile

    @property
    def unexplained(self) -> bool:
        """The label does not hold and the channel barely fires: its heatmap here is not what the label says."""
        return self.label_holds is False and self.low

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``unexplained`` included for readers; ignored by :meth:`from_dict`)."""
        return {"channel": self.channel, "activation": self.activation, "percentile": self.percentile,
                "n_reference": self.n_reference, "label_holds": self.label_holds,
                "low_percentile": self.low_percentile, "unexplained": self.unexplained}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ChannelEvidence":
        holds = data.get("label_holds")
        return cls(channel=int(data["channel"]), activation=float(data["activation"]),
                   percentile=float(data["percentile"]), n_reference=int(data["n_reference"]),
                   label_holds=None if holds is None else bool(holds),
                   low_percentile=float(data.get("low_percentile", LOW_PERCENTILE)))


@dataclass(frozen=True)
class Evidence:
    """Where :py:func:`decompose` finds the evidence it attaches to every channel part.

    Parameters
    ----------
    reference : ActivationCache, torch.Tensor or numpy.ndarray
        The channel activations of the labeling data: a cache holding the layer (its pooled activations,
        the ones the labels were computed from), or an [N, C] matrix of them.
    concepts : ConceptLabels, optional
        Concept labels of the labeled dataset; with ``sample_index`` they give the sample's concepts.
    sample_index : int or sequence of int, optional
        The explained sample's index in the labeled dataset (one per sample for
        :py:func:`decompose_batch`). Also used to check the computed activation against the cache's row.
    concept_row : mapping or boolean vector, or a sequence of them, optional
        The sample's concepts when it is not in the labeled dataset: ``{"stripes": True, ...}``, a
        one-row :py:class:`ConceptLabels`, or a boolean vector [K] in the order of ``concepts.names``
        (for :py:func:`decompose_batch` one per sample, a [B, K] matrix or a B-row ConceptLabels).
    layer : str, optional
        The layer's name in ``reference`` (default: the decomposed layer).
    pooling : {"mean", "max", "sum"} or callable, optional
        How the sample's layer output is pooled to one value per channel: must be the pooling of the
        reference (default: the cache layer's ``pooling`` attribute, ``"mean"`` for a matrix).
    low_percentile : float
        An activation below this percentile of the channel's reference is low (default 50: the median).

    Notes
    -----
    The sample's activation is the layer output CRP records in the decomposition's class pass, after the
    composite's canonizers (e.g. a merged batch norm), as :py:class:`InvertFeatureVisualization` records
    it: record the reference with the same composite. Labels of ``mode="negative"`` searches describe low
    activations; the ``unexplained`` mark assumes positive labels.

    Examples
    --------
    >>> evidence = Evidence(ActivationCache("acts.h5"), concepts=concepts, sample_index=17)  # doctest: +SKIP
    >>> g = decompose(attribution, dataset[17][0][None], None, "layer4", composite, labels=labels,
    ...               evidence=evidence)                                                    # doctest: +SKIP
    >>> [(e.channel, round(e.percentile), e.label_holds, e.unexplained) for e in g.evidence]  # doctest: +SKIP
    [(12, 97, True, False), (40, 8, False, True), ...]
    """

    reference: Any
    concepts: Any = None
    sample_index: Any = None
    concept_row: Any = None
    layer: str | None = None
    pooling: Any = None
    low_percentile: float = LOW_PERCENTILE

    def __post_init__(self) -> None:
        if isinstance(self.reference, (str, os.PathLike)):
            # a path, like label_cache takes: opened read-only (closed with the Evidence's cache)
            object.__setattr__(self, "reference", ActivationCache(self.reference))
        if isinstance(self.low_percentile, bool) or not isinstance(self.low_percentile, (int, float)) or \
                not 0 <= self.low_percentile <= 100:
            raise ValueError(f"low_percentile must be a number in [0, 100], got {self.low_percentile!r}")
        if not (_is_cache(self.reference) or isinstance(self.reference, (torch.Tensor, np.ndarray))):
            raise TypeError(f"reference must be an ActivationCache or an [N, C] tensor or array, "
                            f"got {type(self.reference).__name__}")


def _is_cache(value: Any) -> bool:
    return callable(getattr(value, "activations", None)) and callable(getattr(value, "info", None))


def _per_sample(value: Any, n_samples: int, what: str, single) -> list[Any]:
    """``value`` as a list of one entry per sample (``single(value)``: whether it is one entry)."""
    if value is None:
        return [None] * n_samples
    if single(value):
        if n_samples != 1:
            raise ValueError(f"{what} is given for one sample but {n_samples} are decomposed: pass one per sample")
        return [value]
    values = list(value)
    if len(values) != n_samples:
        raise ValueError(f"{what} has {len(values)} entries for {n_samples} samples")
    return values


def _row_mapping(row: Any, names: Sequence[str] | None):
    """One sample's concepts as something :py:meth:`Formula.evaluate` reads (one-row ConceptLabels or a mapping)."""
    if row is None:
        return None
    if callable(getattr(row, "mask", None)):
        if getattr(row, "n_samples", 1) != 1:
            raise ValueError(f"concept_row must hold one sample, got ConceptLabels with {row.n_samples} rows")
        return row
    if isinstance(row, Mapping):
        return {str(name): torch.tensor([bool(value)]) for name, value in row.items()}
    vector = row.detach().cpu().numpy() if isinstance(row, torch.Tensor) else np.asarray(row)
    if vector.ndim != 1:
        raise ValueError(f"concept_row must be a boolean vector [K], got shape {vector.shape}")
    if names is None:
        raise ValueError("a boolean concept_row needs the concept names: pass concepts= (ConceptLabels) or "
                         "a mapping {name: bool}")
    if len(vector) != len(names):
        raise ValueError(f"concept_row has {len(vector)} entries for {len(names)} concepts")
    return {name: torch.tensor([bool(value)]) for name, value in zip(names, vector.tolist())}


def _sample_concepts(evidence: Evidence, n_samples: int) -> tuple[list[Any], list[int | None]]:
    """Per sample: its concepts (or None) and its index in the labeled dataset (or None)."""
    def is_index(value):
        return is_int(value)

    sample_index = evidence.sample_index
    if isinstance(sample_index, (torch.Tensor, np.ndarray)):
        sample_index = sample_index.tolist()
    indices = _per_sample(sample_index, n_samples, "sample_index", is_index)
    for index in indices:
        if index is not None and not is_index(index):
            raise TypeError(f"sample_index must be an int or a sequence of ints, got {index!r}")
    names = getattr(evidence.concepts, "names", None)
    row_labels = evidence.concept_row
    if callable(getattr(row_labels, "subset", None)) and n_samples > 1 and row_labels.n_samples == n_samples:
        row_labels = [row_labels.subset([i]) for i in range(n_samples)]  # ConceptLabels, one row per sample
    if row_labels is not None:
        def one_row(value):
            if isinstance(value, Mapping) or callable(getattr(value, "mask", None)):
                return True
            if isinstance(value, (torch.Tensor, np.ndarray)):
                return value.ndim == 1
            return all(isinstance(entry, (bool, int, float, np.bool_, np.number)) for entry in value)

        rows = [_row_mapping(row, names) for row in
                _per_sample(row_labels, n_samples, "concept_row", one_row)]
    elif evidence.concepts is not None and evidence.sample_index is not None:
        if not callable(getattr(evidence.concepts, "subset", None)):
            raise TypeError(f"concepts must be a ConceptLabels, got {type(evidence.concepts).__name__}")
        rows = []
        for index in indices:
            if not 0 <= index < evidence.concepts.n_samples:
                raise ValueError(f"sample_index {index} is out of range: concepts hold "
                                 f"{evidence.concepts.n_samples} samples")
            rows.append(evidence.concepts.subset([int(index)]))
    else:
        rows = [None] * n_samples
    return rows, [None if index is None else int(index) for index in indices]


def _evidence_pooling(evidence: Evidence, reference_layer: str):
    """The pooling of the reference: the cache's (checked against ``evidence.pooling``) or the given one."""
    from .recorder import POOLINGS

    recorded = None
    if _is_cache(evidence.reference):
        recorded = evidence.reference.info(reference_layer).get("pooling")
    if evidence.pooling is not None:
        if not callable(evidence.pooling) and evidence.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS} or a callable, got {evidence.pooling!r}")
        if recorded in POOLINGS and evidence.pooling != recorded:
            raise ValueError(f"pooling={evidence.pooling!r} but layer {reference_layer!r} of the cache was "
                             f"recorded with pooling {recorded!r}")
        return evidence.pooling
    if recorded is None:
        return "mean"
    if recorded not in POOLINGS:
        raise ValueError(f"layer {reference_layer!r} of the cache was recorded with pooling {recorded!r}: "
                         f"pass the same function as Evidence(pooling=...)")
    return recorded


def _reference_columns(evidence: Evidence, reference_layer: str, n_channels: int, columns: list[int]):
    """The reference activations [N, len(columns)] (float64 numpy) and the dataset index of row 0."""
    reference = evidence.reference
    cache = _is_cache(reference)
    if not cache and reference.ndim != 2:
        raise ValueError(f"reference must be an [N, C] matrix, got shape {tuple(reference.shape)}")
    stored = reference.n_channels(reference_layer) if cache else reference.shape[1]
    if stored != n_channels:
        raise ValueError(f"the reference of layer {reference_layer!r} has {stored} channels but the decomposed "
                         f"layer has {n_channels}: a reference of another layer?")
    if cache:
        start = int(reference.sample_range[0]) if hasattr(reference, "sample_range") else 0
        values = reference.activations(reference_layer, columns=columns)
    else:
        start, values = 0, reference[:, columns]
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy(), start
    return np.asarray(values, dtype=np.float64), start


def _check_reference_rows(evidence: Evidence, indices: list[int | None], start: int, n_rows: int) -> None:
    """ValueError if the concepts or a sample index do not belong to the reference's samples ``[start,
    start + n_rows)`` (concepts of another dataset would give another sample's concepts)."""
    n_concepts = getattr(evidence.concepts, "n_samples", None)
    allowed = {start + n_rows, int(getattr(evidence.reference, "dataset_length", start + n_rows))}
    if n_concepts is not None and n_concepts not in allowed:
        raise ValueError(f"concepts hold {n_concepts} samples but the reference holds {n_rows} (samples "
                         f"[{start}, {start + n_rows})): they must describe the same samples")
    for index in indices:
        if index is not None and not start <= index < start + n_rows:
            raise ValueError(f"sample_index {index} is not a sample of the reference (samples [{start}, "
                             f"{start + n_rows}))")


def _percentile(reference: np.ndarray, value: float) -> tuple[float, int]:
    """``scipy.stats.percentileofscore(kind="mean")`` over the finite reference values, and their number."""
    finite = reference[np.isfinite(reference)]
    if finite.size == 0:
        raise ValueError("the reference holds no recorded (finite) activation of this channel")
    below = np.count_nonzero(finite < value)
    equal = np.count_nonzero(finite == value)
    return float(100.0 * (below + 0.5 * equal) / finite.size), int(finite.size)


def _collect_evidence(evidence: Evidence, layer: str, activation: torch.Tensor, orders: torch.Tensor,
                      labels: Sequence[Sequence[Any]]) -> list[tuple[ChannelEvidence, ...]]:
    """The evidence of each sample's top channels. ``activation`` is the layer output [B, C, ...]."""
    from .recorder import pool

    n_samples, n_channels = activation.shape[0], activation.shape[1]
    reference_layer = evidence.layer or layer
    pooled = pool(activation.detach(), _evidence_pooling(evidence, reference_layer)).double().cpu()
    rows, indices = _sample_concepts(evidence, n_samples)
    columns = sorted(set(orders.reshape(-1).tolist()))
    reference, start = _reference_columns(evidence, reference_layer, n_channels, columns)
    _check_reference_rows(evidence, indices, start, reference.shape[0])
    position = {channel: i for i, channel in enumerate(columns)}
    results = []
    for i in range(n_samples):
        parts = []
        for k, channel in enumerate(orders[i].tolist()):
            value = float(pooled[i, channel])
            column = reference[:, position[channel]]
            percentile, n_reference = _percentile(column, value)
            row = indices[i] - start if indices[i] is not None else None
            if row is not None and 0 <= row < len(column) and np.isfinite(column[row]) and \
                    abs(column[row] - value) > 1e-3 * abs(value) + 1e-5 * float(np.nanmax(np.abs(column))):
                logger.warning("sample %d, channel %d of layer %r: activation %.6g but the reference holds "
                               "%.6g; recorded with another composite or pooling?", indices[i], channel,
                               reference_layer, value, column[row])
            label = labels[i][k]
            holds = None
            if label is not None and rows[i] is not None:
                holds = bool(label.formula.evaluate(rows[i]).reshape(-1)[0])
            parts.append(ChannelEvidence(channel=int(channel), activation=value, percentile=percentile,
                                         n_reference=n_reference, label_holds=holds,
                                         low_percentile=float(evidence.low_percentile)))
        results.append(tuple(parts))
    return results


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
        The best :py:class:`~crp_invert.Explanation` of each channel (``layer_labels[c][0]``) or None.
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
        """The formula of each channel's label as text (None where unlabeled)."""
        return [None if label is None else str(label.formula) for label in self.labels]

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
        data["evidence"] = None if self.evidence is None else [part.to_dict() for part in self.evidence]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GlocalExplanation":
        """Rebuild from :py:meth:`to_dict` output (TypeError, KeyError or ValueError for anything else)."""
        from ..core.labels import Explanation

        if not isinstance(data, Mapping):
            raise TypeError(f"a GlocalExplanation document must be a JSON object, got {type(data).__name__}")
        try:
            evidence = data.get("evidence")
            return cls(layer=data["layer"], target=int(data["target"]), rank_by=data.get("rank_by", "signed"),
                       labels=tuple(None if label is None else Explanation.from_json(label)
                                    for label in data["labels"]),
                       evidence=None if evidence is None else tuple(ChannelEvidence.from_dict(e) for e in evidence),
                       **{name: _tensor_from_json(data[name]) for name in _TENSOR_FIELDS})
        except (AttributeError, IndexError, OverflowError, RuntimeError) as error:  # a damaged document
            raise ValueError(f"not a GlocalExplanation document: {type(error).__name__}: {error}") from None

    def to_json(self, path=None) -> str:
        """The explanation as JSON text; also written to ``path`` when given."""
        return _write_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, text_or_path) -> "GlocalExplanation":
        """Read an explanation from JSON text or from a file path."""
        return cls.from_dict(_read_json(text_or_path))


def decompose_batch(attribution, samples: torch.Tensor, target, layer: str, composite, labels=None,
                    top_k: int = 8, rank_by: str = "signed", batch_size: int = 32, device=None,
                    progress: bool = False, evidence: Evidence | None = None) -> list[GlocalExplanation]:
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
        INVERT labels of the layer; each channel gets its best Explanation.
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
        Attach, to every channel part, the sample's activation percentile among the labeling data and
        whether the channel's label holds for the sample (``sample_index``/``concept_row`` one per sample).

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
        an unknown ``rank_by``.

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
    from crp.concepts import ChannelConcept

    rank_by = _check_rank_by(rank_by)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if evidence is not None and not isinstance(evidence, Evidence):
        raise TypeError(f"evidence must be an Evidence, got {type(evidence).__name__}")
    model = attribution.model
    _get_module(model, layer)
    device = attribution.device if device is None else torch.device(device)
    data = _prepare(samples, device)
    if data.dim() < 2:
        raise ValueError(f"samples must have a batch dimension, got shape {tuple(data.shape)}")
    n_samples = data.shape[0]

    probe = _probe(model, data, [layer])
    n_channels = _channel_count(probe.shapes, layer)
    targets = _as_targets(target, n_samples, probe.prediction.shape[1], probe.prediction)
    top_k = _check_top_k(top_k, n_channels, layer)
    layer_labels = _layer_labels(labels, layer, n_channels)
    last_call = _LastCall(model, [layer] if probe.calls[layer] > 1 else [])

    with _guard_model(model), last_call.attached():
        # class heatmaps and the relevance of the layer
        class_conditions = [{"y": [t]} for t in targets]
        heatmaps, layer_relevance, layer_activation = _attribute(
            attribution, data, class_conditions, composite, layer, record=True, exclude_parallel=True,
            batch_size=batch_size, mask_map=last_call.mask)
        channel_rel = ChannelConcept().attribute(layer_relevance, abs_norm=False)  # [B, C]
        order = _rank(channel_rel, rank_by)[:, :top_k]  # [B, top_k]

        # one row per (sample, top channel)
        rows = data.repeat_interleave(top_k, dim=0)
        conditions = [{"y": [targets[i]], layer: [int(c)]}
                      for i in range(n_samples) for c in order[i].tolist()]
        channel_heatmaps, _, _ = _attribute(attribution, rows, conditions, composite, layer, record=False,
                                            exclude_parallel=True, batch_size=batch_size, progress=progress,
                                            mask_map=last_call.mask)
        channel_heatmaps = channel_heatmaps.reshape(n_samples, top_k, *channel_heatmaps.shape[1:])

        # the rest: complement channels plus whatever bypasses the layer
        rest_conditions = []
        for i in range(n_samples):
            chosen = set(order[i].tolist())
            complement = [c for c in range(n_channels) if c not in chosen]
            rest_conditions.append({"y": [targets[i]], layer: complement})
        rest_heatmaps, _, _ = _attribute(attribution, data, rest_conditions, composite, layer, record=False,
                                         exclude_parallel=False, batch_size=batch_size, mask_map=last_call.mask)

    part_labels = [tuple(_best_label(layer_labels, c) for c in order[i].tolist()) for i in range(n_samples)]
    parts_evidence = [None] * n_samples
    if evidence is not None:
        parts_evidence = _collect_evidence(evidence, layer, layer_activation, order, part_labels)
    results = []
    for i in range(n_samples):
        total = channel_rel[i].sum()
        relevance = channel_rel[i, order[i]]
        share = relevance / total if total != 0 else torch.zeros_like(relevance)
        results.append(GlocalExplanation(
            layer=layer,
            target=targets[i],
            heatmap=heatmaps[i],
            channels=order[i].clone(),
            channel_heatmaps=channel_heatmaps[i],
            relevance=relevance,
            share=share,
            labels=part_labels[i],
            rest_heatmap=rest_heatmaps[i],
            channel_relevance=channel_rel[i],
            prediction=probe.prediction[i].detach(),
            rank_by=rank_by,
            evidence=parts_evidence[i],
        ))
    return results


def decompose(attribution, sample: torch.Tensor, target, layer: str, composite, labels=None, top_k: int = 8,
              rank_by: str = "signed", batch_size: int = 32, device=None,
              progress: bool = False, evidence: Evidence | None = None) -> GlocalExplanation:
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
        Check each channel part against the labeling data: the sample's activation percentile and whether
        the channel's label holds for it (``GlocalExplanation.evidence``).

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
                           evidence=evidence)[0]


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
    _get_module(model, layer)
    device = attribution.device if device is None else torch.device(device)
    batches = [data] if isinstance(data, torch.Tensor) else data
    if isinstance(target, (torch.Tensor, np.ndarray)):
        target = target.tolist()
    results, offset = [], 0
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        batch = _prepare(batch, device)
        prediction = _probe(model, batch, [layer]).prediction
        if isinstance(target, Sequence) and not isinstance(target, str):
            batch_target = list(target[offset:offset + len(batch)])
        else:
            batch_target = target
        targets = _as_targets(batch_target, len(batch), prediction.shape[1], prediction)
        with _guard_model(model):
            _, rel, _ = _attribute(attribution, batch, [{"y": [t]} for t in targets], composite, layer,
                                   record=True, exclude_parallel=True, batch_size=batch_size, progress=progress)
        results.append(ChannelConcept().attribute(rel, abs_norm=False).cpu())
        offset += len(batch)
    if not results:
        raise ValueError("data holds no samples")
    return torch.cat(results, dim=0)

"""Glocal explanations: a class heatmap decomposed into labeled per-channel heatmaps.

A local explanation (the heatmap of one prediction) is the sum of the conditional heatmaps of the
channels of an earlier layer (CRP). Each channel carries its global INVERT label, which turns the
heatmap into "recognized through channel 296 = box and channel 154 = Chinese text" (paper
section 5.2). The circuits (paper figure 7 and appendix A.8) name the channels that matter most for
a class logit, by direct weight, by mean relevance over a dataset, or by following CRP's
:py:class:`crp.attribution.AttributionGraph` down from one labeled concept.

All conditional heatmaps come from CRP's :py:class:`crp.attribution.CondAttribution`, with several
conditions per backward pass. Hooks that CRP would leave attached after an error are removed.
"""
import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "GlocalExplanation",
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


@contextlib.contextmanager
def _no_leaked_hooks(model: torch.nn.Module):
    """Remove, on exit, every module hook that was registered inside the context.

    CRP's ``CondAttribution`` removes its recording hooks only when a pass succeeds; after an error
    (a bad condition, a keyboard interrupt) they would stay attached to the model. Snapshot the hook
    ids of every module and drop whatever is new when the context exits, also on error.
    """
    modules = list(model.modules())
    before = [{name: set(getattr(module, name, {}).keys()) for name in _HOOK_DICTS} for module in modules]
    try:
        yield
    finally:
        for module, known in zip(modules, before):
            for name in _HOOK_DICTS:
                hooks = getattr(module, name, None)
                if not hooks:
                    continue
                for key in [key for key in hooks if key not in known[name]]:
                    hooks.pop(key, None)
                    for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(module, extra, {}).pop(key, None)


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
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
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


def _as_targets(target, n_samples: int, n_outputs: int, prediction: torch.Tensor) -> List[int]:
    if target is None:
        return prediction.argmax(dim=1).tolist()
    if isinstance(target, torch.Tensor):
        target = target.tolist()
    elif isinstance(target, np.ndarray):
        target = target.tolist()
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        targets = [int(target)] * n_samples
    elif isinstance(target, Sequence) and not isinstance(target, str):
        targets = list(target)
        if len(targets) != n_samples:
            raise ValueError(f"got {len(targets)} targets for {n_samples} samples")
    else:
        raise TypeError(f"target must be an int, a sequence of ints or None, got {type(target).__name__}")
    for value in targets:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"targets must be ints, got {value!r}")
        if not 0 <= value < n_outputs:
            raise ValueError(f"target {value} is out of range: the model has {n_outputs} outputs "
                             f"(expected 0 <= target < {n_outputs})")
    return [int(value) for value in targets]


def _probe(model: torch.nn.Module, data: torch.Tensor, layer: str) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """One forward pass without gradients: the model output and the output shape of ``layer``."""
    module = _get_module(model, layer)
    shapes = {}

    def hook(_module, _input, output):
        shapes["out"] = tuple(output.shape)

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            prediction = model(data)
    finally:
        handle.remove()
    if "out" not in shapes:
        raise ValueError(f"layer {layer!r} was not called in the forward pass of the model")
    if prediction.dim() != 2:
        raise ValueError(f"the model output must have shape [batch, classes], got {tuple(prediction.shape)}")
    return prediction, shapes["out"]


def _prepare(sample: torch.Tensor, device) -> torch.Tensor:
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    return sample.detach().to(device)


def _attribute(attribution, data: torch.Tensor, conditions: List[Dict[str, List[int]]], composite, layer,
               record: bool, exclude_parallel: bool, batch_size: int, progress: bool = False):
    """Run CondAttribution on row i of ``data`` with ``conditions[i]``, in chunks of ``batch_size`` rows.

    Returns the heatmaps [R, ...] and, when ``record``, the relevance of ``layer`` [R, C, ...].
    """
    heatmaps, relevances = [], []
    n_rows = len(conditions)
    chunks = range(0, n_rows, batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, total=math.ceil(n_rows / batch_size), desc="conditional heatmaps")
    for start in chunks:
        rows = data[start:start + batch_size].detach().clone().requires_grad_(True)
        result = attribution(rows, conditions[start:start + batch_size], composite,
                             record_layer=[layer] if record else [], exclude_parallel=exclude_parallel)
        heatmaps.append(result.heatmap.detach())
        if record:
            relevances.append(result.relevances[layer].detach())
    heatmap = torch.cat(heatmaps, dim=0)
    return heatmap, (torch.cat(relevances, dim=0) if record else None)


# ------------------------------------------------------------------------------------------------
# decomposition
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class GlocalExplanation:
    """The heatmap of one prediction split into the labeled conditional heatmaps of a layer's channels.

    Attributes
    ----------
    layer : str
        The layer whose channels decompose the heatmap.
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
    """

    layer: str
    target: int
    heatmap: torch.Tensor
    channels: torch.Tensor
    channel_heatmaps: torch.Tensor
    relevance: torch.Tensor
    share: torch.Tensor
    labels: Tuple[Any, ...]
    rest_heatmap: torch.Tensor
    channel_relevance: torch.Tensor
    prediction: torch.Tensor
    rank_by: str = "signed"

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

    def label_strings(self) -> List[Optional[str]]:
        """The formula of each channel's label as text (None where unlabeled)."""
        return [None if label is None else str(label.formula) for label in self.labels]

    def to(self, device) -> "GlocalExplanation":
        """A copy with all tensors on ``device``."""
        values = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
                  for name, value in self.__dict__.items()}
        return GlocalExplanation(**values)


def decompose_batch(attribution, samples: torch.Tensor, target, layer: str, composite, labels=None,
                    top_k: int = 8, rank_by: str = "signed", batch_size: int = 32, device=None,
                    progress: bool = False) -> List[GlocalExplanation]:
    """Decompose the heatmaps of a batch of samples into the conditional heatmaps of ``layer``'s channels.

    Each sample gets its own top channels. All conditional heatmaps (``top_k`` per sample, plus one
    rest heatmap) are computed with several conditions per backward pass (``batch_size`` rows each).

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
    """
    from crp.concepts import ChannelConcept

    rank_by = _check_rank_by(rank_by)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    model = attribution.model
    _get_module(model, layer)
    device = attribution.device if device is None else torch.device(device)
    data = _prepare(samples, device)
    if data.dim() < 2:
        raise ValueError(f"samples must have a batch dimension, got shape {tuple(data.shape)}")
    n_samples = data.shape[0]

    prediction, layer_shape = _probe(model, data, layer)
    if len(layer_shape) < 2:
        raise ValueError(f"layer {layer!r} has output shape {layer_shape}; expected [batch, channels, ...]")
    n_channels = layer_shape[1]
    targets = _as_targets(target, n_samples, prediction.shape[1], prediction)
    top_k = _check_top_k(top_k, n_channels, layer)
    layer_labels = _layer_labels(labels, layer, n_channels)

    with _no_leaked_hooks(model):
        # class heatmaps and the relevance of the layer
        class_conditions = [{"y": [t]} for t in targets]
        heatmaps, layer_relevance = _attribute(attribution, data, class_conditions, composite, layer,
                                               record=True, exclude_parallel=True, batch_size=batch_size)
        channel_rel = ChannelConcept().attribute(layer_relevance, abs_norm=False)  # [B, C]
        order = _rank(channel_rel, rank_by)[:, :top_k]  # [B, top_k]

        # one row per (sample, top channel)
        rows = data.repeat_interleave(top_k, dim=0)
        conditions = [{"y": [targets[i]], layer: [int(c)]}
                      for i in range(n_samples) for c in order[i].tolist()]
        channel_heatmaps, _ = _attribute(attribution, rows, conditions, composite, layer, record=False,
                                         exclude_parallel=True, batch_size=batch_size, progress=progress)
        channel_heatmaps = channel_heatmaps.reshape(n_samples, top_k, *channel_heatmaps.shape[1:])

        # the rest: complement channels plus whatever bypasses the layer
        rest_conditions = []
        for i in range(n_samples):
            chosen = set(order[i].tolist())
            complement = [c for c in range(n_channels) if c not in chosen]
            rest_conditions.append({"y": [targets[i]], layer: complement})
        rest_heatmaps, _ = _attribute(attribution, data, rest_conditions, composite, layer, record=False,
                                      exclude_parallel=False, batch_size=batch_size)

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
            labels=tuple(_best_label(layer_labels, c) for c in order[i].tolist()),
            rest_heatmap=rest_heatmaps[i],
            channel_relevance=channel_rel[i],
            prediction=prediction[i].detach(),
            rank_by=rank_by,
        ))
    return results


def decompose(attribution, sample: torch.Tensor, target, layer: str, composite, labels=None, top_k: int = 8,
              rank_by: str = "signed", batch_size: int = 32, device=None,
              progress: bool = False) -> GlocalExplanation:
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
        As in :py:func:`decompose_batch`.

    Returns
    -------
    GlocalExplanation

    Examples
    --------
    >>> g = decompose(attribution, sample, target, layer="features.40", composite=composite,
    ...               labels=layer_labels, top_k=8)   # doctest: +SKIP
    >>> g.channel_heatmaps.shape                      # doctest: +SKIP
    torch.Size([8, 224, 224])
    """
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    if sample.dim() < 2 or sample.shape[0] != 1:
        raise ValueError(f"decompose explains one sample of shape [1, ...] (CRP's convention), got shape "
                         f"{tuple(sample.shape)}; use decompose_batch for a batch, or sample.unsqueeze(0)")
    if isinstance(target, (Sequence, torch.Tensor, np.ndarray)) and not isinstance(target, str):
        raise TypeError("decompose takes one int target (or None); use decompose_batch for several")
    return decompose_batch(attribution, sample, target, layer, composite, labels=labels, top_k=top_k,
                           rank_by=rank_by, batch_size=batch_size, device=device, progress=progress)[0]


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
        As in :py:func:`decompose_batch`.

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
        prediction, layer_shape = _probe(model, batch, layer)
        if isinstance(target, Sequence) and not isinstance(target, str):
            batch_target = list(target[offset:offset + len(batch)])
        else:
            batch_target = target
        targets = _as_targets(batch_target, len(batch), prediction.shape[1], prediction)
        with _no_leaked_hooks(model):
            _, rel = _attribute(attribution, batch, [{"y": [t]} for t in targets], composite, layer,
                                record=True, exclude_parallel=True, batch_size=batch_size, progress=progress)
        results.append(ChannelConcept().attribute(rel, abs_norm=False).cpu())
        offset += len(batch)
    if not results:
        raise ValueError("data holds no samples")
    return torch.cat(results, dim=0)

"""What produced a layer's data: hashes of the model and of the recording setup, stored in caches so that
a resumed or combined recording refuses data of another model or setup."""

from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["model_hash", "fingerprint"]


def model_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's ``state_dict`` (names, dtypes, shapes and bytes of parameters and buffers).

    Parameters
    ----------
    model : torch.nn.Module
        The model, as given by the user (before canonizers are applied).

    Returns
    -------
    str
        Hex digest.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.reshape(-1).contiguous().cpu()
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def fingerprint(
    model_hash: str,
    layer: str,
    dataset_length: int,
    pooling: str,
    concept: str = "ChannelConcept",
    composite: str = "",
    relevance: str = "",
) -> str:
    """Fingerprint of what produced a layer's data in a cache.

    Covers the model (via :func:`model_hash`), the layer name, the dataset length, the pooling, the CRP
    concept class, the composite (its canonizers change activations, e.g. merged BatchNorms) and a description
    of how relevances were computed, but *not* the sample range, so that shards of one recording share it.

    Returns
    -------
    str
        Hex digest (SHA-256 of the canonical JSON of the arguments).
    """
    payload = json.dumps(
        {
            "model": str(model_hash),
            "layer": str(layer),
            "dataset_length": int(dataset_length),
            "pooling": str(pooling),
            "concept": str(concept),
            "composite": str(composite),
            "relevance": str(relevance),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


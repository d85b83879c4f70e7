"""Record a torchvision model's activations and relevances on an ImageFolder during CRP's run.

Runs unchanged in one process or under torchrun (one process per GPU, on one or several nodes)::

    python record_imagefolder.py /data/my-images --out run
    torchrun --standalone --nproc_per_node=8 record_imagefolder.py /data/my-images --out run

Writes into ``--out``: ``acts.h5`` (the activation cache; under torchrun an index over one shard per rank),
``concepts.npz`` (one concept per class folder, plus the parents of ``--hierarchy``) and ``crp/`` (CRP's
ActMax / RelMax reference samples, as a plain ``FeatureVisualization.run`` writes them).
"""

import argparse
import json
import logging
from pathlib import Path

import torch
import torchvision
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from torchvision import transforms
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

from crp_invert import ConceptLabels, InvertFeatureVisualization
from crp_invert.parallel.group import barrier, distributed_session, get_rank, local_device
from crp_invert.parallel.recording import run_sharded

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's weights expect


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """CRP's preprocess_fn: the dataset yields images in [0, 1], so CRP stores viewable reference samples."""
    return transforms.functional.normalize(batch, MEAN, STD)


def canonizers_for(model_name: str) -> list:
    """zennit's canonizers for the torchvision families (merge batch norms, make skip connections explicit)."""
    if model_name.startswith(("resnet", "resnext", "wide_resnet")):
        return [ResNetCanonizer()]
    if model_name.startswith("vgg"):
        return [VGGCanonizer()]
    raise ValueError(f"add the zennit canonizer for {model_name!r} here")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", help="an ImageFolder: one sub-folder of images per class")
    parser.add_argument("--out", default="run", help="output folder (shared by all nodes)")
    parser.add_argument("--model", default="resnet50", help="a torchvision model name")
    parser.add_argument("--weights", default="DEFAULT", help="torchvision weights, or 'none' for random ones")
    parser.add_argument("--layers", nargs="+", default=["layer3", "layer4"], help="modules to record")
    parser.add_argument("--hierarchy", help="JSON {parent: [children]} over the class folder names")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)

    # the dataset yields [0, 1] images in a fixed order (ImageFolder sorts); CRP normalizes with preprocess_fn
    dataset = torchvision.datasets.ImageFolder(args.images, transforms.Compose([
        transforms.Resize(args.resize), transforms.CenterCrop(args.crop), transforms.ToTensor()]))
    hierarchy = json.loads(Path(args.hierarchy).read_text()) if args.hierarchy else None

    with distributed_session():              # torchrun's environment; nothing happens without torchrun
        device = local_device(args.device)   # cuda:LOCAL_RANK under torchrun: one GPU per process
        weights = None if args.weights.lower() == "none" else args.weights
        torch.manual_seed(0)                 # every rank must hold the same model, also with random weights
        model = torchvision.models.get_model(args.model, weights=weights).eval().to(device)
        composite = EpsilonPlusFlat(canonizers=canonizers_for(args.model))
        layer_map = {name: ChannelConcept() for name in args.layers}
        if get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            concepts = ConceptLabels.from_targets(dataset.targets, dataset.classes, hierarchy=hierarchy)
            concepts.save(out / "concepts.npz")
        barrier()                            # the other ranks wait until rank 0 made the folder
        fv = InvertFeatureVisualization(CondAttribution(model, device=device), dataset, layer_map,
                                        preprocess_fn=normalize, path=str(out / "crp"), device=device,
                                        activation_cache=str(out / "acts.h5"))
        # every rank records its share of the samples into its own shard; rank 0 then writes acts.h5, and
        # a second launch after a crash resumes every shard where it stopped
        run_sharded(fv, composite, 0, len(dataset), batch_size=args.batch_size)


if __name__ == "__main__":
    main()

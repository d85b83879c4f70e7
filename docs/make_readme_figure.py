"""Make the README figure docs/demo_glocal.png from the embedded demo (default settings).

    python docs/make_readme_figure.py

Runs ``crp_invert.demo.pipeline.run_demo`` in a temporary folder, then decomposes one demo image with the
demo's activation and relevance labels of conv3 and the evidence of its activation cache: the image, its class
heatmap and the conditional heatmaps of the most relevant conv3 channels, each titled with the reliable
label that holds on this image (and its source, ``act`` or ``rel``) or "no reliable label (holds here)",
with the image's activation percentile among the labeling data.
"""

import logging
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = 0  # the demo image shown
TOP_K = 4
SEED = 2  # the demo's images (passed to run_demo, so the figure rebuilds the same data set)

logger = logging.getLogger("make_readme_figure")


def glocal_figure(out: Path, sample: int = SAMPLE, top_k: int = TOP_K):
    """The glocal figure of demo image ``sample`` from the files a demo run wrote into ``out``."""
    from crp.attribution import CondAttribution
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    from crp_invert import ConceptLabels, Evidence, LayerLabels, decompose
    from crp_invert.demo.data import AuditDataset
    from crp_invert.demo.model import load_demo_model
    from crp_invert.demo.pipeline import DEFAULT_SAMPLES, GLOCAL_LAYER
    from crp_invert.plot import plot_glocal

    model = load_demo_model("cpu")
    dataset = AuditDataset(DEFAULT_SAMPLES, seed=SEED)
    image, target = dataset[sample][:2]
    composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
    evidence = Evidence(str(out / "activations.h5"), concepts=ConceptLabels.load(out / "concepts.npz"),
                        sample_index=sample)
    glocal = decompose(CondAttribution(model), image[None], int(target), GLOCAL_LAYER, composite,
                       labels=LayerLabels.from_json(out / "labels" / f"{GLOCAL_LAYER}.json"),
                       relevance_labels=LayerLabels.from_json(out / "labels_relevance" / f"{GLOCAL_LAYER}.json"),
                       top_k=top_k, evidence=evidence)
    return plot_glocal(glocal, image=image, class_name=dataset.class_names[glocal.target], ncols=top_k + 3)


def main() -> None:
    from crp_invert.demo.pipeline import DEFAULT_SAMPLES, run_demo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as folder:
        run_demo(folder, n_samples=DEFAULT_SAMPLES, seed=SEED, max_channels=0, progress=False, top_k=TOP_K,
                 n_glocal=1)
        glocal_figure(Path(folder)).savefig(HERE / "demo_glocal.png", dpi=100)
    logger.info("wrote %s", HERE / "demo_glocal.png")


if __name__ == "__main__":
    main()

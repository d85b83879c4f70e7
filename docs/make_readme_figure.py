"""Make the README figure docs/demo_glocal.png from the embedded demo (default settings).

    python docs/make_readme_figure.py

Runs ``crp_invert.demo.pipeline.run_demo`` in a temporary folder and copies its first glocal figure:
a demo image, its class heatmap and the labeled conditional heatmaps of the most relevant conv3 channels.
"""

import shutil
import tempfile
from pathlib import Path

from crp_invert.demo.pipeline import run_demo

HERE = Path(__file__).resolve().parent


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        summary = run_demo(folder, max_channels=0, progress=False, top_k=4, n_glocal=1)
        shutil.copyfile(summary.files["glocal_0"], HERE / "demo_glocal.png")
    print("wrote", HERE / "demo_glocal.png")


if __name__ == "__main__":
    main()

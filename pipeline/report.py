"""The one-page evaluation picture: samples, their nearest training images, class shares, FID over training."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.files import atomic_path  # noqa: E402
from pipeline.images import tile, to_uint8  # noqa: E402


def draw_report(path: Path, samples: np.ndarray, nearest: np.ndarray, fake_share: np.ndarray,
                real_share: np.ndarray, fid_history: pd.DataFrame, title: str) -> None:
    """Writes the report PNG: samples over their nearest training images, class shares, FID per epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1.4, 1, 1]})
    pairs = tile(to_uint8(np.concatenate([samples, nearest])), cols=len(samples))
    axes[0].imshow(pairs.squeeze(-1) if pairs.shape[-1] == 1 else pairs, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("generated (top) and nearest training image in pixels (bottom)")
    axes[0].axis("off")

    classes = np.arange(len(fake_share))
    axes[1].bar(classes - 0.2, real_share, width=0.4, label="real (train split)")
    axes[1].bar(classes + 0.2, fake_share, width=0.4, label="generated")
    axes[1].set_xticks(classes)
    axes[1].set_xlabel("class by the evaluator's classifier")
    axes[1].set_ylabel("share of images")
    axes[1].legend()

    best = fid_history.loc[fid_history["fid"].idxmin()]
    axes[2].plot(fid_history["epoch"], fid_history["fid"], marker="o", label="FID (training schedule)")
    axes[2].scatter([best["epoch"]], [best["fid"]], s=120, facecolors="none", edgecolors="red",
                    label=f"best: epoch {int(best['epoch'])}")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("FID (classifier features)")
    axes[2].set_yscale("log")
    axes[2].legend()

    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

"""Figures shared by the evaluation and stage-1 recipes (matplotlib, written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mammorg.plotting import pyplot, save_figure


def confusion_png(ref: list, pred: list, classes: list, title: str, path: Path) -> None:
    plt = pyplot()
    labels = [*classes, "none"]
    index = {c: i for i, c in enumerate(labels)}
    mat = np.zeros((len(labels), len(labels)), dtype=int)
    for r, p in zip(ref, pred):
        mat[index.get(r or "none", -1), index.get(p or "none", -1)] += 1
    keep = [i for i in range(len(labels)) if mat[i].sum() or mat[:, i].sum()]
    mat = mat[np.ix_(keep, keep)]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(mat, cmap="Blues")
    ticks = [labels[i] for i in keep]
    ax.set_xticks(range(len(keep)), ticks, rotation=45)
    ax.set_yticks(range(len(keep)), ticks)
    for (i, j), v in np.ndenumerate(mat):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set_xlabel("generated")
    ax.set_ylabel("reference")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)

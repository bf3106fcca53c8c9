"""How well can a lesion's descriptor be read from a crop around it? (analysis for issue #19)

Renders single lesions of the synthetic generator (``mammorg.synth``) into full views of a given
height, cuts a square crop of 44 mm around each lesion's box (the box is known: this is the
ceiling of a reader that is told where the lesion is), resamples it to 48 pixels and trains a
small CNN (the size of ``LesionCrops``'s encoder) on 80% of the crops to predict the mass margin
or the calcification morphology; prints the held-out accuracy and the accuracy of the lesion's
BI-RADS category that the predicted descriptor implies by the generator's rule, as one JSON line.

Usage: python scripts/descriptor_ceiling.py HEIGHT {mass,calcification} LESIONS [EPOCHS]
(e.g. 256 mass 600 100: the knowledge benchmark's views and about its number of masses).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mammorg.labels import DENSITIES
from mammorg.synth import findings
from mammorg.synth.phantom import FIELD_MM, render_view_with_boxes

CROP_MM, SIZE = 44.0, 48


def sample(rng: np.random.Generator, kind: str, height: int) -> tuple[torch.Tensor, str, str] | None:
    """One rendered lesion's crop, its descriptor and its category (None: not drawn)."""
    malignant = bool(rng.random() < 0.45)
    lesion = findings._mass(rng, malignant) if kind == "mass" else findings._calcification(rng, malignant)
    lesion.update(findings._location(rng, "L"))
    exam = {
        "true_density": str(rng.choice(DENSITIES, p=(0.12, 0.38, 0.38, 0.12))),
        "breasts": {"L": {"lesions": [lesion]}, "R": {"lesions": []}},
    }
    width = height // 2
    image, boxes = render_view_with_boxes(exam, "L_" + str(rng.choice(["CC", "MLO"])), height, width, rng)
    if not boxes:
        return None
    x0, y0, x1, y1 = boxes[0][1]
    half = CROP_MM * height / FIELD_MM / 2  # pixels
    theta = torch.tensor(
        [[[half / width, 0, (x0 + x1) / width - 1], [0, half / height, (y0 + y1) / height - 1]]], dtype=torch.float32
    )
    grid = F.affine_grid(theta, [1, 1, SIZE, SIZE], align_corners=False)
    crop = F.grid_sample(torch.from_numpy(image)[None, None], grid, align_corners=False)[0]
    descriptor = lesion["margin"] if kind == "mass" else lesion["morphology"]
    return crop, descriptor, findings.lesion_birads(lesion)


def main() -> None:
    height, kind, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 25
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    start = time.time()
    data = [d for d in (sample(rng, kind, height) for _ in range(count)) if d is not None]
    classes = sorted({d[1] for d in data})
    x = torch.stack([d[0] for d in data])
    y = torch.tensor([classes.index(d[1]) for d in data])
    train = int(0.8 * len(data))
    widths = (1, 32, 64, 96, 128)
    layers: list[nn.Module] = []
    for i, o in zip(widths, widths[1:]):  # noqa: RUF007 (pairs of widths)
        layers += [nn.Conv2d(i, o, 3, padding=1), nn.GELU(), nn.MaxPool2d(2)]
    net = nn.Sequential(*layers[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], len(classes)))
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=0.01)
    for _ in range(epochs):
        order = torch.randperm(train)
        for i in range(0, train, 64):
            idx = order[i : i + 64]
            batch = x[idx].flip(-1) if torch.rand(1) < 0.5 else x[idx]
            loss = F.cross_entropy(net(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        predicted = net(x[train:]).argmax(1)
    implied = []
    for k, p in enumerate(predicted.tolist()):
        category = data[train + k][2]
        if kind == "mass":  # the shape is given: only "irregular" with "spiculated" makes a 5
            lesion = {"type": "mass", "shape": "irregular" if category == "5" else "oval", "margin": classes[p]}
        else:
            lesion = {"type": "calcification", "morphology": classes[p]}
        implied.append(findings.lesion_birads(lesion) == category)
    print(
        json.dumps(
            {
                "height": height,
                "kind": kind,
                "lesions": len(data),
                "training_crops": train,
                "epochs": epochs,
                "descriptor_accuracy": round(float((predicted == y[train:]).float().mean()), 3),
                "category_accuracy": round(float(np.mean(implied)), 3),
                "seconds": round(time.time() - start),
            }
        )
    )


if __name__ == "__main__":
    main()

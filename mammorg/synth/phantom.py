"""Procedural rendering of one mammographic view (chest wall on the left, dense = bright)."""

from __future__ import annotations

import numpy as np

_FIBRO_FRACTION = {"a": 0.06, "b": 0.22, "c": 0.45, "d": 0.7}
_DEPTH_X = {"anterior": 0.72, "middle": 0.48, "posterior": 0.25}
FIELD_MM = 220.0  # image height in millimetres
_FAT_LEVEL, _DENSE_LEVEL = 0.28, 0.62  # intensity of fatty and fibroglandular tissue


def lowpass_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Gaussian-filtered white noise (via FFT), normalised to zero mean and unit std."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-0.5 * (fx**2 + fy**2) * (2 * np.pi * scale) ** 2)
    out = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=shape)
    return (out - out.mean()) / (out.std() + 1e-8)


class Canvas:
    """A view being drawn: intensity image plus the breast geometry lesions are placed in."""

    def __init__(self, rng: np.random.Generator, height: int, width: int, projection: str):
        self.rng, self.h, self.w, self.projection = rng, height, width, projection
        self.px_per_mm = height / FIELD_MM
        self.a = width * rng.uniform(0.72, 0.9)  # nipple distance from the chest wall
        self.b = height * rng.uniform(0.3, 0.38)
        self.cy = height * (0.5 if projection == "CC" else 0.56)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.yy, self.xx = yy, xx
        self.radius = np.sqrt((xx / self.a) ** 2 + ((yy - self.cy) / self.b) ** 2)
        self.image = np.zeros((height, width), dtype=np.float32)

    @property
    def breast(self) -> np.ndarray:
        return self.radius <= 1.0

    def point(self, lesion: dict) -> tuple[float, float]:
        """Pixel (y, x) of a lesion; CC: lateral up, MLO: upper up; same depth in both views."""
        x = self.a * _DEPTH_X.get(lesion.get("depth", "middle"), 0.5)
        quadrant = lesion.get("quadrant", "upper outer")
        if quadrant == "axillary tail":
            return (
                (self.cy - 0.95 * self.b, 0.12 * self.a)
                if self.projection == "MLO"
                else (self.cy - 0.8 * self.b, 0.1 * self.a)
            )
        word = "outer" if self.projection == "CC" else "upper"
        sign = -1.0 if word in quadrant else 1.0
        half_height = self.b * np.sqrt(max(1 - (x / self.a) ** 2, 0.05))
        offset = (0.25 + 0.35 * (lesion.get("clock", 1) % 3) / 2) * half_height
        return self.cy + sign * offset, x

    def patch(self, cy: float, cx: float, half: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
        """Slices of a square window around (cy, cx) with local coordinates (dy, dx)."""
        y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, self.h)
        x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, self.w)
        return (slice(y0, y1), slice(x0, x1), self.yy[y0:y1, x0:x1] - cy, self.xx[y0:y1, x0:x1] - cx)


def _background(c: Canvas, density: str) -> None:
    frac = _FIBRO_FRACTION[density] * c.rng.uniform(0.85, 1.15)
    texture = lowpass_noise(c.rng, (c.h, c.w), scale=c.h / 60) + 0.5 * lowpass_noise(c.rng, (c.h, c.w), scale=c.h / 200)
    centre_bias = 1.2 * (1.0 - c.radius)  # glandular tissue concentrates centrally
    field = texture + centre_bias
    inside = c.breast
    threshold = np.quantile(field[inside], 1.0 - min(frac, 0.95))
    tissue = 1.0 / (1.0 + np.exp(-(field - threshold) * 1.6))
    fat, dense = _FAT_LEVEL, _DENSE_LEVEL
    img = fat + (dense - fat) * tissue
    img *= 1.0 - 0.35 * np.clip(c.radius, 0, 1) ** 6  # thinner periphery
    c.image = np.where(inside, img, 0.0).astype(np.float32)


def _pectoral(c: Canvas) -> None:
    depth = c.a * c.rng.uniform(0.25, 0.38)
    height = c.h * c.rng.uniform(0.45, 0.6)
    muscle = c.xx < depth * (1.0 - c.yy / height)
    c.image[muscle] = 0.72 + 0.04 * lowpass_noise(c.rng, (c.h, c.w), 4.0)[muscle]


def _skin_and_nipple(c: Canvas, thick_skin: bool, retracted: bool) -> tuple[float, float, float, float] | None:
    """Draw the skin line and the nipple; the box (x0, y0, x1, y1) of a retracted nipple (the
    drawn-in nipple and where it would stand out), else None. The skin has no box."""
    band = 0.955 if thick_skin else 0.985
    skin = (c.radius > band) & (c.radius <= 1.0)
    c.image[skin] = np.maximum(c.image[skin], 0.5 if thick_skin else 0.42)
    r = 3.0 * c.px_per_mm
    ys, xs, dy, dx = c.patch(c.cy, c.a, int(3 * r))
    bump = (dx / (1.3 * r)) ** 2 + (dy / r) ** 2 <= 1.0
    if retracted:
        c.image[ys, xs][bump & (dx < 0)] *= 0.55
        x0, y0 = max(c.a - 1.3 * r, 0.0), max(c.cy - r, 0.0)
        return float(x0), float(y0), float(min(c.a + 1.3 * r + 1.0, c.w)), float(min(c.cy + r + 1.0, c.h))
    c.image[ys, xs][bump & (dx >= 0)] = 0.45
    return None


def _insert_dense(c: Canvas, ys: slice, xs: slice, profile: np.ndarray, contrast: float) -> None:
    """Blend a compact structure at least as dense as fibroglandular tissue into the image.

    Its core sits ``contrast`` above the brighter of the local tissue and the fibroglandular
    level, so dense breasts lower its conspicuity (masking) without hiding it outright. Nothing
    is drawn outside the body (where the image is still zero).
    """
    local = c.image[ys, xs]
    core = np.maximum(local, _DENSE_LEVEL) + contrast
    c.image[ys, xs] = np.where(local > 0, local + (core - local) * profile, local)


def _blob(c: Canvas, y: float, x: float, radius_px: float, contrast: float, lesion: dict) -> None:
    half = int(radius_px * 3 + 4)
    ys, xs, dy, dx = c.patch(y, x, half)
    theta = np.arctan2(dy, dx)
    rng = c.rng
    aspect = {"round": 1.0, "oval": 0.65}.get(str(lesion.get("shape")), 0.8)
    rot = rng.uniform(0, np.pi)
    edge = radius_px * np.sqrt(1.0 / ((np.cos(theta - rot)) ** 2 + (np.sin(theta - rot) / aspect) ** 2))
    if lesion.get("shape") == "irregular":
        for k in (2, 3, 5):
            edge *= 1 + 0.12 * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    margin = lesion.get("margin", "circumscribed")
    if margin == "microlobulated":
        edge *= 1 + 0.07 * np.sin(12 * theta + rng.uniform(0, 6.3))
    softness = {
        "circumscribed": 0.04,
        "obscured": 0.15,
        "microlobulated": 0.06,
        "indistinct": 0.3,
        "spiculated": 0.12,
    }.get(margin, 0.1)
    dist = np.sqrt(dy**2 + dx**2)
    profile = 1.0 / (1.0 + np.exp((dist - edge) / (softness * radius_px + 0.5)))
    scale = {"high": 1.3, "equal": 1.0, "low": 0.7}.get(str(lesion.get("density")), 1.0)
    _insert_dense(c, ys, xs, profile, contrast * scale)
    if margin == "spiculated":
        _spicules(c, y, x, radius_px, 2.4 * radius_px, contrast * 0.8, n=14)


def _spicules(c: Canvas, y: float, x: float, r0: float, r1: float, contrast: float, n: int) -> None:
    half = int(r1 + 3)
    ys, xs, dy, dx = c.patch(y, x, half)
    dist = np.sqrt(dy**2 + dx**2)
    theta = np.arctan2(dy, dx)
    out = np.zeros_like(dist)
    for angle in c.rng.uniform(-np.pi, np.pi, size=n):
        diff = np.angle(np.exp(1j * (theta - angle)))
        width = 0.9 / np.maximum(dist, 1.0)
        line = np.exp(-0.5 * (diff / width) ** 2) * (dist > r0 * 0.5) * (dist < r1)
        out = np.maximum(out, line * (1 - dist / r1))
    c.image[ys, xs] += contrast * out * (c.image[ys, xs] > 0)


_CALC_STYLE = {  # (count range, radius px, brightness, elongation)
    "amorphous": ((10, 25), 0.6, 0.35, 1.0),
    "coarse heterogeneous": ((6, 15), 1.2, 0.6, 1.3),
    "fine pleomorphic": ((10, 30), 0.8, 0.55, 1.5),
    "fine linear branching": ((10, 25), 0.7, 0.6, 4.0),
    "coarse or popcorn-like": ((2, 5), 3.0, 0.75, 1.2),
    "round": ((4, 12), 1.4, 0.7, 1.0),
    "rim": ((2, 5), 2.5, 0.7, 1.0),
    "vascular": ((1, 3), 0.8, 0.6, 12.0),
    "large rod-like": ((3, 6), 1.3, 0.75, 6.0),
}


def _calcifications(c: Canvas, y: float, x: float, lesion: dict, difficulty: float) -> None:
    counts, radius, bright, elong = _CALC_STYLE[lesion["morphology"]]
    rng = c.rng
    n = int(rng.integers(*counts))
    spread = lesion["size_mm"] * c.px_per_mm / 2
    dist = lesion["distribution"]
    if dist in ("linear", "segmental"):
        angle = rng.uniform(-0.4, 0.4)
        t = rng.uniform(-1, 1, n) * spread * (1.6 if dist == "linear" else 1.2)
        wid = 0.12 if dist == "linear" else 0.45
        pts = np.stack([y + t * np.sin(angle) + rng.normal(0, wid * spread, n) * 0.5, x + t * np.cos(angle)], 1)
    elif dist in ("diffuse", "scattered"):
        pts = np.stack([c.cy + rng.uniform(-0.7, 0.7, n) * c.b, rng.uniform(0.15, 0.85, n) * c.a], 1)
    else:
        pts = rng.normal(0, spread * (0.5 if dist == "grouped" else 1.0), (n, 2)) + (y, x)  # noqa: RUF005
    gain = bright * (1.0 - 0.5 * difficulty)
    for py, px in pts:
        _calc_dot(c, py, px, radius * rng.uniform(0.7, 1.3), gain, elong, lesion["morphology"])


def _calc_dot(c: Canvas, y: float, x: float, r: float, gain: float, elong: float, morph: str) -> None:
    half = int(max(r * elong, r) * 2 + 2)
    ys, xs, dy, dx = c.patch(y, x, half)
    angle = c.rng.uniform(0, np.pi)
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    d2 = (u / (r * elong)) ** 2 + (v / r) ** 2
    dot = np.exp(-d2)
    if morph == "rim":
        dot = dot - np.exp(-d2 * 3.0)
    c.image[ys, xs] += gain * dot


def _distortion(c: Canvas, y: float, x: float, size_px: float, contrast: float) -> None:
    _spicules(c, y, x, 0.0, size_px, contrast * 1.4, n=18)


def _asymmetry(c: Canvas, y: float, x: float, size_px: float, contrast: float) -> None:
    ys, xs, dy, dx = c.patch(y, x, int(size_px * 1.5))
    blob = np.exp(-0.5 * ((dy / (0.6 * size_px)) ** 2 + (dx / (0.45 * size_px)) ** 2))
    _insert_dense(c, ys, xs, 0.8 * blob, 0.3 * contrast)  # tissue, not a mass: no convex border


def _lymph_node(c: Canvas, y: float, x: float, lesion: dict, contrast: float) -> None:
    r = lesion["size_mm"] * c.px_per_mm / 2
    ys, xs, dy, dx = c.patch(y, x, int(r * 2 + 3))
    d = np.sqrt((dy / r) ** 2 + (dx / (0.65 * r)) ** 2)
    body = 1.0 / (1.0 + np.exp((d - 1.0) / 0.08))
    if not lesion["enlarged"]:
        body -= 0.7 / (1.0 + np.exp((d - 0.45) / 0.08))  # fatty hilum
    _insert_dense(c, ys, xs, np.clip(body, 0.0, 1.0), 0.8 * contrast)


def _changed_box(before: np.ndarray, after: np.ndarray, share: float = 0.2) -> tuple[float, float, float, float] | None:
    """The box (x0, y0, x1, y1) of the pixels a lesion changed by at least ``share`` of its
    largest change: where it is visible."""
    diff = np.abs(after - before)
    peak = float(diff.max())
    if peak <= 0:
        return None
    ys, xs = np.nonzero(diff >= share * peak)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def render_view_with_boxes(
    exam: dict, view: str, height: int, width: int, rng: np.random.Generator, difficulty: float = 0.5
) -> tuple[np.ndarray, list[tuple[int, tuple[float, float, float, float]]]]:
    """Render one view of an exam truth (see ``sample_exam``): float32 image in [0, 1] and the
    box of each lesion drawn on it, ``(index in the breast's lesions, (x0, y0, x1, y1))`` in
    pixels. Skin thickening has no box (it runs along the whole skin line); a retracted nipple is
    boxed; axillary nodes show on the MLO only."""
    side, projection = view.split("_")
    c = Canvas(rng, height, width, projection)
    _background(c, exam["true_density"])
    if projection == "MLO":
        _pectoral(c)
    lesions = exam["breasts"][side]["lesions"]
    kinds = {x["type"] for x in lesions}
    contrast = 0.22 * (1.15 - 0.75 * difficulty)
    size_gain = 1.2 - 0.4 * difficulty
    boxes = []
    for index, lesion in enumerate(lesions):
        if lesion["type"] in ("skin_thickening", "nipple_retraction"):
            continue
        if lesion.get("quadrant") == "axillary tail" and projection == "CC":
            continue  # axillary nodes are seen on the MLO only
        y, x = c.point(lesion)
        size_px = lesion["size_mm"] * c.px_per_mm * size_gain
        before = c.image.copy()
        if lesion["type"] == "mass":
            _blob(c, y, x, size_px / 2, contrast, lesion)
        elif lesion["type"] == "calcification":
            _calcifications(c, y, x, lesion, difficulty)
        elif lesion["type"] == "architectural_distortion":
            _distortion(c, y, x, size_px, contrast)
        elif lesion["type"] == "asymmetry":
            _asymmetry(c, y, x, size_px, contrast)
        elif lesion["type"] == "lymph_node":
            _lymph_node(c, y, x, lesion, contrast)
        box = _changed_box(before, c.image)
        if box is not None:
            boxes.append((index, box))
    nipple = _skin_and_nipple(c, "skin_thickening" in kinds, "nipple_retraction" in kinds)
    if nipple is not None:
        boxes.append((next(i for i, x in enumerate(lesions) if x["type"] == "nipple_retraction"), nipple))
    img = c.image + rng.normal(0, 0.012, c.image.shape).astype(np.float32) * (c.image > 0)
    return np.clip(img, 0.0, 1.0).astype(np.float32), boxes


def render_view(
    exam: dict, view: str, height: int, width: int, rng: np.random.Generator, difficulty: float = 0.5
) -> np.ndarray:
    """Render one view of an exam truth (see ``sample_exam``); float32 in [0, 1]."""
    return render_view_with_boxes(exam, view, height, width, rng, difficulty)[0]

"""Synthetic surface-inspection images: brushed metal/plastic texture with drawn defects.

Only numpy and Pillow are used, so the demo can make images for devices without torch.
Every function is deterministic for a given seed / generator state.

Classes (index order is the model's output order): ok, scratch, spot, crack.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = ("ok", "scratch", "spot", "crack")
SIZE = 64
_SS = 4  # supersampling factor for drawing defect masks (anti-aliased thin lines)
# The model input is (pixel / 255 - MEAN) / STD per RGB channel, float32 NCHW [N, 3, 64, 64].
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.25, 0.25, 0.25)

__all__ = ["CLASSES", "MEAN", "SIZE", "STD", "make_dataset", "make_image", "to_input", "write_images"]


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a small random grid upsampled bicubically to SIZE x SIZE."""
    grid = rng.uniform(0.0, 255.0, size=(cells, cells)).astype(np.uint8)
    img = Image.fromarray(grid, mode="L").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A brushed surface, HWC float32 in 0..255 (before defects and sensor noise)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    # Directional streaks: 1-D noise along the brushing direction, stretched across the image.
    angle = rng.uniform(0.0, np.pi)
    s = xx * np.cos(angle) + yy * np.sin(angle)
    knots = np.arange(-SIZE * 2, SIZE * 2 + 1, dtype=np.float32)
    streak_1d = rng.normal(0.0, 1.0, size=knots.shape).astype(np.float32)
    streak_1d = np.convolve(streak_1d, np.ones(2, dtype=np.float32) / 2.0, mode="same")
    streaks = np.interp(s.ravel(), knots, streak_1d).reshape(SIZE, SIZE).astype(np.float32)

    base = rng.uniform(80.0, 190.0)
    gray = (
        base
        + rng.uniform(4.0, 14.0) * _smooth_noise(rng, int(rng.integers(3, 7)))
        + rng.uniform(1.5, 6.0) * streaks
    )
    # Illumination gradient (harmless variation present on every class).
    gx, gy = rng.uniform(-0.35, 0.35, size=2)
    gray = gray + (gx * (xx - SIZE / 2) + gy * (yy - SIZE / 2))

    tint = rng.uniform(-9.0, 9.0, size=3).astype(np.float32)
    out: np.ndarray = gray[:, :, None] + tint[None, None, :]
    return out.astype(np.float32)


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, steps: int = 24) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 1.0, steps)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    return [(float(x) * _SS, float(y) * _SS) for x, y in pts]


def _draw_scratch(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    for _ in range(int(rng.choice([1, 1, 1, 2]))):
        length = rng.uniform(22.0, 60.0)
        angle = rng.uniform(0.0, 2 * np.pi)
        center = rng.uniform(14.0, SIZE - 14.0, size=2)
        d = np.array([np.cos(angle), np.sin(angle)]) * length / 2
        normal = np.array([-d[1], d[0]]) / max(np.linalg.norm(d), 1e-6)
        bend = rng.uniform(-0.12, 0.12) * length
        pts = _bezier(center - d, center + normal * bend, center + d)
        width = int(rng.integers(2, 6))  # 0.5 .. 1.25 px after downsampling
        draw.line(pts, fill=255, width=width, joint="curve")


def _draw_spot(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    n = int(rng.choice([1, 1, 2, 3]))
    for _ in range(n):
        cx, cy = rng.uniform(8.0, SIZE - 8.0, size=2)
        rx = rng.uniform(1.8, 7.0)
        ry = rx * rng.uniform(0.55, 1.0)
        if rng.random() < 0.5:
            rx, ry = ry, rx
        box = [(cx - rx) * _SS, (cy - ry) * _SS, (cx + rx) * _SS, (cy + ry) * _SS]
        draw.ellipse(box, fill=int(rng.integers(170, 256)))


def _crack_branch(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    n_seg: int,
    width: int,
    depth: int,
) -> None:
    pts = [start.copy()]
    pos = start.copy()
    for _ in range(n_seg):
        heading += rng.uniform(-0.9, 0.9)
        step = rng.uniform(2.5, 5.0)
        pos = pos + step * np.array([np.cos(heading), np.sin(heading)])
        pts.append(pos.copy())
        if depth > 0 and rng.random() < 0.12:
            _crack_branch(
                draw,
                rng,
                pos.copy(),
                heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2),
                int(rng.integers(2, 6)),
                max(2, width - 1),
                depth - 1,
            )
    draw.line([(float(x) * _SS, float(y) * _SS) for x, y in pts], fill=255, width=width, joint="curve")


def _draw_crack(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    start = rng.uniform(14.0, SIZE - 14.0, size=2)
    heading = rng.uniform(0.0, 2 * np.pi)
    n_seg = int(rng.integers(4, 10))
    width = int(rng.integers(3, 7))
    _crack_branch(draw, rng, start, heading, n_seg, width, depth=2)
    # Cracks usually run both ways from where they start.
    if rng.random() < 0.7:
        _crack_branch(draw, rng, start, heading + np.pi, int(rng.integers(2, 7)), width, depth=1)


def make_image(label: int, rng: np.random.Generator, difficulty: float = 1.0) -> np.ndarray:
    """Make one SIZE x SIZE RGB image (HWC uint8) of class ``CLASSES[label]``.

    ``difficulty`` > 1 lowers the defect contrast and raises the sensor noise a little.
    """
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label {label} out of range 0..{len(CLASSES) - 1}")
    img = _texture(rng)

    name = CLASSES[label]
    mask_img = Image.new("L", (SIZE * _SS, SIZE * _SS), 0)
    draw = ImageDraw.Draw(mask_img)
    if name == "scratch":
        _draw_scratch(draw, rng)
        sign = 1.0 if rng.random() < 0.6 else -1.0
        contrast = rng.uniform(14.0, 60.0)
    elif name == "spot":
        _draw_spot(draw, rng)
        sign = -1.0 if rng.random() < 0.65 else 1.0
        contrast = rng.uniform(12.0, 50.0)
    elif name == "crack":
        _draw_crack(draw, rng)
        sign = -1.0
        contrast = rng.uniform(20.0, 70.0)
    else:
        sign = 0.0
        contrast = 0.0
    if name == "spot":
        mask_img = mask_img.filter(ImageFilter.GaussianBlur(radius=_SS * rng.uniform(0.3, 1.3)))
    mask_img = mask_img.resize((SIZE, SIZE), Image.Resampling.BOX)
    mask = np.asarray(mask_img, dtype=np.float32) / 255.0
    contrast /= difficulty
    img = img + (sign * contrast * mask)[:, :, None]

    # Harmless variation: a few faint single-pixel specks on any class (dust), then sensor noise.
    for _ in range(int(rng.integers(0, 4))):
        y, x = rng.integers(0, SIZE, size=2)
        img[y, x, :] += rng.uniform(-12.0, 12.0)
    sigma = rng.uniform(1.5, 6.0) * difficulty
    img = img + rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
    out: np.ndarray = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def make_dataset(n: int, seed: int, difficulty: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Make ``n`` images (N,64,64,3 uint8) and labels (N int64), balanced over classes, shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    rng.shuffle(labels)
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, lab in enumerate(labels):
        images[i] = make_image(int(lab), rng, difficulty)
    return images, labels


def to_input(images: np.ndarray) -> np.ndarray:
    """Turn HWC or NHWC uint8 RGB images into the model input: normalised float32 NCHW."""
    batch = images[None] if images.ndim == 3 else images
    mean = np.asarray(MEAN, dtype=np.float32)
    std = np.asarray(STD, dtype=np.float32)
    x: np.ndarray = (batch.astype(np.float32) / np.float32(255.0) - mean) / std
    out: np.ndarray = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
    return out


def write_images(folder: Path, n: int, seed: int) -> list[tuple[Path, str]]:
    """Write ``n`` PNGs named like ``img_00012_scratch.png`` into ``folder``; return (path, label) pairs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = make_dataset(n, seed)
    written: list[tuple[Path, str]] = []
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        name = CLASSES[int(lab)]
        path = folder / f"img_{i:05d}_{name}.png"
        Image.fromarray(img, mode="RGB").save(path)
        written.append((path, name))
    return written

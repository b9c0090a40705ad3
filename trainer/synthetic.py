"""Synthetic flowers for tests and the demo, in the lab's TFRecord schema plus a ground-truth mask.

Each class is a flower-like object whose SHAPE and COLOUR decide the class; backgrounds are varied
clutter drawn from one distribution shared by every class, so they carry no class signal and a
model (or an explanation) that relies on them is wrong. The object's mask is stored in the same
record (feature ``mask``, PNG), so explanations can be scored on whether they point at the flower.
Readers of the lab's schema ignore the extra feature.

Everything is drawn with PIL's C primitives and vectorised numpy, with every random draw taken
from the caller's ``np.random.Generator``: fast (hundreds of images a second on one core) and
byte-for-byte reproducible for a seed.
"""

from __future__ import annotations

import math
import os

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import fire
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw
from tqdm import tqdm

from trainer.data import make_example, shard_paths, take_numpy
from trainer.plots import plot_samples_grid
from trainer.schema import CLASSES, IMAGE_SIZE

RGB = tuple[int, int, int]
Point = tuple[float, float]

JPEG_QUALITY = 90


def _jitter(rng: np.random.Generator, colour: RGB, amount: int = 15) -> RGB:
    """``colour`` with each channel moved by up to ``amount``: no two flowers share a colour."""
    shifted = np.clip(np.asarray(colour) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return int(shifted[0]), int(shifted[1]), int(shifted[2])


#: Roses and tulips come in the same reds, pinks and oranges, as real ones do, so that only the
#: bloom's shape tells them apart: a model (and an explanation) must look at the flower, not a
#: colour blob, and PIC's accuracy curve stays defined (a blurred rose is no longer a rose).
SHARED_BLOOM_COLOURS: tuple[RGB, ...] = ((200, 25, 40), (170, 15, 60), (225, 70, 150), (245, 115, 40))


def _clutter_colour(rng: np.random.Generator) -> RGB:
    """A colour of any hue pulled halfway to grey: THE one colour distribution of every background
    element, whatever the class. Muted so that a saturated red wall is not as much a rose as the
    rose itself, to a model that looks at colour."""
    c = (0.45 * rng.integers(0, 256, 3) + 70).astype(int)
    return int(c[0]), int(c[1]), int(c[2])


def _rotate(points: list[Point], cx: float, cy: float, angle: float) -> list[Point]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * cos - (y - cy) * sin, cy + (x - cx) * sin + (y - cy) * cos) for x, y in points]


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Gradient + random blobs, lines and rectangles; one distribution for every class.

    The clutter is drawn at half resolution and scaled up, which softens its edges like an
    out-of-focus background (and costs a quarter of the drawing time).
    """
    w, h = size
    hw, hh = max(w // 2, 1), max(h // 2, 1)
    c0 = np.asarray(_clutter_colour(rng), np.float32)
    c1 = np.asarray(_clutter_colour(rng), np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:hh, 0:hw].astype(np.float32)
    t = (xx * math.cos(angle) + yy * math.sin(angle))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    small = Image.fromarray((c0 + (c1 - c0) * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(small)
    count = int(rng.integers(5, 14))
    kinds = rng.integers(0, 3, count)
    corners = rng.integers(-10, max(hw, hh), (count, 2))
    extents = rng.integers(5, 45, (count, 2))
    widths = rng.integers(1, 4, count)
    for kind, (x0, y0), (dx, dy), width in zip(kinds, corners, extents, widths):
        box = [int(x0), int(y0), int(x0 + dx), int(y0 + dy)]
        colour = _clutter_colour(rng)
        if kind == 0:
            draw.rectangle(box, fill=colour)
        elif kind == 1:
            draw.ellipse(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=int(width))
    return small.resize((w, h), Image.BILINEAR)


def _petals(draw: ImageDraw.ImageDraw, cx: float, cy: float, n: int, length: float, width: float,
            colour: RGB, phase: float, rng: np.random.Generator, offset: float = 0.55, amount: int = 8) -> None:
    """``n`` elliptical petals radiating from (cx, cy), each an ellipse along its own direction."""
    t = np.linspace(0, 2 * math.pi, 12, endpoint=False)
    ex, ey = np.cos(t) * length * 0.5, np.sin(t) * width * 0.5
    angles = phase + 2 * math.pi * np.arange(n) / n + rng.uniform(-0.08, 0.08, n)
    shades = np.clip(np.asarray(colour) + rng.integers(-amount, amount + 1, (n, 3)), 0, 255)
    for a, shade in zip(angles, shades):
        ca, sa = math.cos(a), math.sin(a)
        px, py = cx + ca * length * offset, cy + sa * length * offset
        xs, ys = px + ex * ca - ey * sa, py + ex * sa + ey * ca
        draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=tuple(int(v) for v in shade))


def _disc(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, colour: RGB) -> None:
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)


def _daisy(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    """Many thin white petals and a small yellow centre."""
    _petals(draw, cx, cy, int(rng.integers(16, 24)), r, r * rng.uniform(0.15, 0.22),
            _jitter(rng, (242, 242, 236), 10), rng.uniform(0, 2 * math.pi), rng)
    _disc(draw, cx, cy, r * rng.uniform(0.22, 0.3), _jitter(rng, (240, 195, 30)))


def _dandelion(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    """A dense, fluffy yellow disc: a solid core under hundreds of short radial florets."""
    base = _jitter(rng, (248, 212, 24), 10)
    _disc(draw, cx, cy, r * 0.8, base)
    n = int(r * 5)
    angles = rng.uniform(0, 2 * math.pi, n)
    inner = r * np.sqrt(rng.uniform(0.05, 0.8, n))
    outer = np.minimum(inner + r * rng.uniform(0.15, 0.35, n), r)
    shades = np.clip(np.asarray(base) + rng.integers(-30, 20, (n, 1)) * np.array([1, 1, 0.4]), 0, 255).astype(int)
    for a, r0, r1, shade in zip(angles, inner, outer, shades):
        ca, sa = math.cos(a), math.sin(a)
        draw.line([cx + r0 * ca, cy + r0 * sa, cx + r1 * ca, cy + r1 * sa], fill=tuple(shade.tolist()), width=2)


def _roses(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    """Layers of round petals (red, crimson, pink or orange), each layer smaller, darker and turned
    further: a spiral."""
    colour = _jitter(rng, SHARED_BLOOM_COLOURS[int(rng.integers(0, len(SHARED_BLOOM_COLOURS)))], 18)
    phase = rng.uniform(0, 2 * math.pi)
    for layer in range(4):
        rr = r * (1.0 - layer * 0.22)
        shade = tuple(int(c * (1.0 - 0.14 * layer)) for c in colour)
        _petals(draw, cx, cy, 6 - layer // 2, rr, rr * 0.8, shade, phase + layer * 0.55, rng)  # type: ignore[arg-type]
    _disc(draw, cx, cy, r * 0.15, _jitter(rng, (95, 0, 20), 10))


def _sunflowers(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    """Large yellow-orange petals around a big dark-brown seed disc."""
    _petals(draw, cx, cy, int(rng.integers(11, 16)), r * 1.1, r * rng.uniform(0.32, 0.42),
            _jitter(rng, (250, 172, 12), 12), rng.uniform(0, 2 * math.pi), rng)
    _disc(draw, cx, cy, r * rng.uniform(0.45, 0.55), _jitter(rng, (80, 45, 15), 10))


def _tulips(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    """A cup-shaped bloom (red, crimson, pink, orange or purple) on a green stem with a leaf, tilted."""
    tilt = rng.uniform(-0.35, 0.35)
    green = _jitter(rng, (45, 145, 45))
    stem = _rotate([(cx, cy + r * 0.3), (cx + rng.uniform(-0.1, 0.1) * r, cy + r * 1.7)], cx, cy, tilt)
    draw.line([c for p in stem for c in p], fill=green, width=max(3, int(r * 0.12)))
    side = 1 if rng.random() < 0.5 else -1
    leaf = [(cx, cy + r * 1.6), (cx + side * r * 0.55, cy + r * 0.9), (cx + side * r * 0.7, cy + r * 0.55),
            (cx + side * r * 0.2, cy + r * 1.2)]
    draw.polygon(_rotate(leaf, cx, cy, tilt), fill=_jitter(rng, green, 10))
    palette = SHARED_BLOOM_COLOURS + ((150, 55, 200),)  # purple: tulips only
    colour = _jitter(rng, palette[int(rng.integers(0, len(palette)))], 15)
    cup = [(-0.7, -0.65), (-0.35, -0.2), (0.0, -0.8), (0.35, -0.2), (0.7, -0.65), (0.62, 0.2),
           (0.3, 0.5), (-0.3, 0.5), (-0.62, 0.2)]
    draw.polygon(_rotate([(cx + x * r, cy + y * r) for x, y in cup], cx, cy, tilt), fill=colour)
    inner = [(-0.35, -0.2), (0.0, -0.8), (0.35, -0.2), (0.2, 0.35), (-0.2, 0.35)]
    draw.polygon(_rotate([(cx + x * r, cy + y * r) for x, y in inner], cx, cy, tilt),
                 fill=tuple(int(c * 0.82) for c in colour))


#: One drawing function per class, in ``CLASSES`` order.
_DRAWERS = {"daisy": _daisy, "dandelion": _dandelion, "roses": _roses, "sunflowers": _sunflowers,
            "tulips": _tulips}
assert tuple(_DRAWERS) == CLASSES, "one drawer per class, in schema order"


def render_sample(rng: np.random.Generator, class_index: int,
                  image_size: tuple[int, int] = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic flower of class ``class_index`` on clutter: ``(uint8 [H, W, 3], bool mask [H, W])``.

    The mask is exactly the pixels the flower covers in the final image (occluders removed).
    """
    if not 0 <= class_index < len(CLASSES):
        raise ValueError(f"class_index {class_index} is outside [0, {len(CLASSES)})")
    h, w = image_size
    img = _background(rng, (w, h))
    r = min(h, w) * rng.uniform(0.16, 0.28)
    cx, cy = rng.uniform(r * 0.9, w - r * 0.9), rng.uniform(r * 0.9, h - r * 0.9)
    # Drawn on a transparent layer so that its alpha is exactly the object's pixels.
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    _DRAWERS[CLASSES[class_index]](ImageDraw.Draw(layer), cx, cy, r, rng)
    alpha = layer.getchannel("A")
    img.paste(layer, (0, 0), alpha)
    if rng.random() < 0.2:  # occasional partial occlusion by a clutter-coloured branch in front
        a = rng.uniform(0, math.pi)
        ox, oy = cx + rng.uniform(-0.6, 0.6) * r, cy + rng.uniform(-0.6, 0.6) * r
        ends = [ox - 2 * w * math.cos(a), oy - 2 * w * math.sin(a), ox + 2 * w * math.cos(a), oy + 2 * w * math.sin(a)]
        width = int(rng.integers(5, 14))
        ImageDraw.Draw(img).line(ends, fill=_clutter_colour(rng), width=width)
        ImageDraw.Draw(alpha).line(ends, fill=0, width=width)
    # Camera-like exposure and sensor noise over the whole picture, the same for every class.
    pixels = np.asarray(img, np.float32) * np.float32(rng.uniform(0.85, 1.12))
    pixels += rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(rng.uniform(3.0, 10.0))
    return np.clip(pixels, 0, 255).astype(np.uint8), np.asarray(alpha) > 0


def _write_split(directory: str, n: int, rng: np.random.Generator, num_shards: int,
                 image_size: tuple[int, int], desc: str) -> str:
    os.makedirs(directory, exist_ok=True)
    labels = np.arange(n) % len(CLASSES)  # balanced: counts differ by at most one
    rng.shuffle(labels)
    paths = shard_paths(directory, max(1, min(num_shards, n)))
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    try:
        for i, label in enumerate(tqdm(labels, desc=desc, unit="img")):
            image, mask = render_sample(rng, int(label), image_size)
            example = make_example(image, int(label), mask=mask, jpeg_quality=JPEG_QUALITY)
            writers[i % len(writers)].write(example.SerializeToString())
    finally:
        for writer in writers:
            writer.close()
    return os.path.join(directory, "*.tfrec")


def write_dataset(output_dir: str, num_train: int = 400, num_eval: int = 100, seed: int = 42, num_shards: int = 4,
                  image_size: tuple[int, int] = IMAGE_SIZE) -> dict:
    """Write ``output_dir/train/*.tfrec`` and ``output_dir/validation/*.tfrec`` with balanced classes.

    Deterministic for a seed; the two splits draw from independent streams, so changing
    ``num_train`` does not change the validation images.
    """
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"num_train and num_eval must be >= 1, got {num_train} and {num_eval}")
    train_rng, eval_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    train = _write_split(os.path.join(output_dir, "train"), num_train, train_rng, num_shards, image_size, "train")
    evaluation = _write_split(os.path.join(output_dir, "validation"), num_eval, eval_rng, num_shards, image_size,
                              "validation")
    return {"train_pattern": train, "eval_pattern": evaluation, "num_train": num_train, "num_eval": num_eval}


def main(output_dir: str = "data/sample", num_train: int = 400, num_eval: int = 100, seed: int = 42,
         num_shards: int = 4) -> dict:
    """CLI: write the dataset and a 3x3 grid of labelled training samples (``samples.png``)."""
    summary = write_dataset(output_dir, num_train, num_eval, seed, num_shards)
    images, labels = take_numpy(summary["train_pattern"], 9)
    summary["samples_png"] = plot_samples_grid(images, labels, CLASSES, os.path.join(output_dir, "samples.png"))
    print(f"Wrote {num_train} train and {num_eval} validation images to {output_dir} (grid: samples.png)")
    return summary


if __name__ == "__main__":
    fire.Fire(main)

"""Synthetic flowers for tests and the demo, in the lab's TFRecord schema plus a ground-truth mask.

Each class is a flower-like object whose SHAPE and COLOUR decide the class; backgrounds are varied
clutter drawn from one distribution shared by every class, so they carry no class signal. The
object's mask is stored in the same record (feature ``mask``, PNG), so explanations can be scored
on whether they point at the flower. Readers of the lab's schema ignore the extra feature.
"""

from __future__ import annotations

import io
import math
import os

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import fire
import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from trainer.schema import CLASSES, FEATURE_CLASS, FEATURE_IMAGE, FEATURE_MASK, FEATURE_ONE_HOT, IMAGE_SIZE

RGB = tuple[int, int, int]


def _jitter(rng: np.random.Generator, colour: RGB, amount: int = 18) -> RGB:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)  # type: ignore[return-value]


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A random colour pulled halfway to grey: clutter of every hue, less vivid than the flowers
    (a saturated red wall would be as much a rose as the rose to a colour-driven model)."""
    return (0.5 * rng.integers(0, 256, 3) + 0.5 * 128).astype(np.int64)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Gradient + noise + random blobs, lines and rectangles; one distribution for every class."""
    w, h = size
    c0, c1 = _muted(rng), _muted(rng)
    t = np.linspace(0, 1, h if rng.random() < 0.5 else w)
    grad = (c0[None, :] * (1 - t[:, None]) + c1[None, :] * t[:, None])
    arr = np.broadcast_to(grad[:, None, :], (h, w, 3)) if len(t) == h else np.broadcast_to(grad[None, :, :], (h, w, 3))
    arr = np.clip(arr + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(4, 12)):
        colour = tuple(int(v) for v in _muted(rng))
        x0, y0 = rng.integers(-20, w), rng.integers(-20, h)
        x1, y1 = x0 + rng.integers(10, 90), y0 + rng.integers(10, 90)
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(2, 7)))
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.5))))


def _petals(draw: ImageDraw.ImageDraw, cx: float, cy: float, n: int, length: float, width: float,
            colour: RGB, phase: float, rng: np.random.Generator) -> None:
    for i in range(n):
        a = phase + 2 * math.pi * i / n
        px, py = cx + math.cos(a) * length * 0.55, cy + math.sin(a) * length * 0.55
        # an ellipse along the petal's direction, as a polygon
        pts = []
        for k in range(12):
            t = 2 * math.pi * k / 12
            ex, ey = math.cos(t) * length * 0.5, math.sin(t) * width * 0.5
            pts.append((px + ex * math.cos(a) - ey * math.sin(a), py + ex * math.sin(a) + ey * math.cos(a)))
        draw.polygon(pts, fill=_jitter(rng, colour, 10))


def _draw_flower(draw: ImageDraw.ImageDraw, cls: int, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    """Draw class ``cls`` (index into CLASSES) centred at (cx, cy) with radius ``r``."""
    phase = rng.uniform(0, 2 * math.pi)
    name = CLASSES[cls]
    if name == "daisy":  # many thin white petals, small yellow centre
        _petals(draw, cx, cy, int(rng.integers(14, 20)), r, r * 0.22, _jitter(rng, (245, 245, 240)), phase, rng)
        c = r * 0.28
        draw.ellipse([cx - c, cy - c, cx + c, cy + c], fill=_jitter(rng, (240, 200, 30)))
    elif name == "dandelion":  # dense fluffy yellow disc
        base = _jitter(rng, (250, 215, 20))
        for k in range(int(r * 3)):
            a, d = rng.uniform(0, 2 * math.pi), r * math.sqrt(rng.uniform(0, 1))
            x, y = cx + d * math.cos(a), cy + d * math.sin(a)
            s = rng.uniform(1.5, 3.5)
            draw.ellipse([x - s, y - s, x + s, y + s], fill=_jitter(rng, base, 25))
        draw.ellipse([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], outline=base, width=2)
    elif name == "roses":  # layered red spiral of round petals
        colour = _jitter(rng, (190, 20, 40), 25)
        for layer in range(4):
            rr = r * (1.0 - layer * 0.22)
            shade = tuple(int(c * (1.0 - 0.15 * layer)) for c in colour)
            _petals(draw, cx, cy, 6 - layer // 2, rr, rr * 0.8, shade, phase + layer * 0.5, rng)
        draw.ellipse([cx - r * 0.15, cy - r * 0.15, cx + r * 0.15, cy + r * 0.15], fill=(90, 0, 15))
    elif name == "sunflowers":  # large yellow-orange petals, big dark-brown centre
        _petals(draw, cx, cy, int(rng.integers(10, 14)), r * 1.1, r * 0.4, _jitter(rng, (250, 170, 10)), phase, rng)
        c = r * 0.5
        draw.ellipse([cx - c, cy - c, cx + c, cy + c], fill=_jitter(rng, (80, 45, 15), 10))
    else:  # tulips: cup-shaped bloom on a green stem
        colour = _jitter(rng, [(220, 60, 150), (150, 50, 200), (250, 120, 40)][int(rng.integers(0, 3))], 15)
        draw.line([cx, cy + r * 0.3, cx + rng.uniform(-8, 8), cy + r * 1.8], fill=_jitter(rng, (40, 150, 40)),
                  width=max(3, int(r * 0.12)))
        cup = [(cx - r * 0.7, cy - r * 0.6), (cx - r * 0.35, cy - r * 0.15), (cx, cy - r * 0.75),
               (cx + r * 0.35, cy - r * 0.15), (cx + r * 0.7, cy - r * 0.6), (cx + r * 0.6, cy + r * 0.2),
               (cx + r * 0.3, cy + r * 0.5), (cx - r * 0.3, cy + r * 0.5), (cx - r * 0.6, cy + r * 0.2)]
        draw.polygon(cup, fill=colour)


def render_sample(rng: np.random.Generator, class_index: int,
                  image_size: tuple[int, int] = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic flower of class ``class_index``: ``(uint8 [H, W, 3], bool mask [H, W])``."""
    h, w = image_size
    img = _background(rng, (w, h))
    scale = min(h, w)
    r = scale * rng.uniform(0.17, 0.3)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    mask = Image.new("L", (w, h), 0)
    # draw onto a transparent layer so the mask is exactly the object's pixels
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    _draw_flower(ImageDraw.Draw(layer), class_index, cx, cy, r, rng)
    alpha = layer.getchannel("A")
    if rng.random() < 0.2:  # occasional partial occlusion by a background-like bar
        occ = ImageDraw.Draw(alpha)
        x = cx + rng.uniform(-r, r)
        occ.rectangle([x, 0, x + rng.uniform(6, 16), h], fill=0)
    img.paste(layer.convert("RGB"), (0, 0), alpha)
    mask.paste(alpha)
    return np.asarray(img, dtype=np.uint8), np.asarray(mask) > 0


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _example(image: np.ndarray, mask: np.ndarray, label: int, num_classes: int):
    import tensorflow as tf

    one_hot = [0.0] * num_classes
    one_hot[label] = 1.0
    feature = {
        FEATURE_IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[_encode(image, "JPEG", quality=90)])),
        FEATURE_CLASS: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        FEATURE_ONE_HOT: tf.train.Feature(float_list=tf.train.FloatList(value=one_hot)),
        FEATURE_MASK: tf.train.Feature(bytes_list=tf.train.BytesList(value=[_encode(mask.astype(np.uint8) * 255, "PNG")])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def _write_split(directory: str, n: int, rng: np.random.Generator, num_shards: int,
                 image_size: tuple[int, int], desc: str) -> str:
    import tensorflow as tf

    os.makedirs(directory, exist_ok=True)
    labels = np.arange(n) % len(CLASSES)  # balanced
    rng.shuffle(labels)
    shards = max(1, min(num_shards, n))
    writers = [tf.io.TFRecordWriter(os.path.join(directory, f"flowers-{s:05d}-of-{shards:05d}.tfrec"))
               for s in range(shards)]
    try:
        for i, label in enumerate(tqdm(labels, desc=desc, unit="img", leave=False)):
            image, mask = render_sample(rng, int(label), image_size)
            writers[i % shards].write(_example(image, mask, int(label), len(CLASSES)).SerializeToString())
    finally:
        for writer in writers:
            writer.close()
    return os.path.join(directory, "*.tfrec")


def write_dataset(output_dir: str, num_train: int = 400, num_eval: int = 100, seed: int = 42, num_shards: int = 4,
                  image_size: tuple[int, int] = IMAGE_SIZE) -> dict:
    """Write ``train/`` and ``validation/`` TFRecord shards; deterministic for a seed."""
    train_rng, eval_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    train = _write_split(os.path.join(output_dir, "train"), num_train, train_rng, num_shards, image_size, "train")
    evaluation = _write_split(os.path.join(output_dir, "validation"), num_eval, eval_rng, num_shards, image_size,
                              "validation")
    return {"train_pattern": train, "eval_pattern": evaluation, "num_train": num_train, "num_eval": num_eval}


def main(output_dir: str = "data/sample", num_train: int = 400, num_eval: int = 100, seed: int = 42,
         num_shards: int = 4) -> dict:
    """CLI: write the dataset and a 3x3 grid of labelled samples (``samples.png``)."""
    from trainer.data import take_numpy
    from trainer.plots import plot_samples_grid

    summary = write_dataset(output_dir, num_train, num_eval, seed, num_shards)
    images, labels = take_numpy(summary["train_pattern"], 9)
    plot_samples_grid(images, labels, CLASSES, os.path.join(output_dir, "samples.png"))
    print(f"Wrote {num_train} train and {num_eval} validation images to {output_dir} (grid: samples.png)")
    return summary


if __name__ == "__main__":
    fire.Fire(main)

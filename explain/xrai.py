"""XRAI region attributions from precomputed Integrated Gradients.

XRAI: Kapishnikov et al. 2019, https://arxiv.org/abs/1906.02825. The region algorithm (multi-scale
Felzenszwalb segmentation, then regions ranked greedily by attribution gain) is
``saliency.core.XRAI``'s; its own IG path (one Python call per step, per baseline) is replaced by
our batched IG for the black and white baselines. Both region steps give exactly ``saliency``'s
result, computed faster (tested against it): the segmentation dilates each mask in its box
(:func:`segment`), and the greedy ranking scores every remaining segment at once with one sparse
product per step (:func:`rank_regions`) instead of three full-image mask operations per segment.
"""

from __future__ import annotations

from typing import Callable

import trainer  # noqa: F401  (saliency imports TensorFlow)

import numpy as np
from saliency.core.xrai import XRAIParameters, _get_segments_felzenszwalb
from scipy import sparse
from skimage.morphology import dilation, disk


#: ``saliency``'s default dilation radius of each segment (its ``_get_segments_felzenszwalb``).
DILATION_RADIUS = 5
#: A segment adding fewer new pixels than this to the regions chosen so far is dropped: read from
#: ``saliency``'s own defaults, so the ranking keeps matching its ``_xrai``.
MIN_PIXEL_DIFF: int = XRAIParameters().experimental_params["min_pixel_diff"]


def segment(x_value: np.ndarray) -> list[np.ndarray]:
    """XRAI's multi-scale Felzenszwalb segments of an image, exactly ``saliency``'s: its own
    segmentation, and each segment dilated by the same disk. ``saliency`` dilates every segment's
    mask over the whole image, half of the segmentation's cost; a mask only grows within the
    disk's radius of its bounding box, so it is dilated there alone (same result, tested)."""
    masks = _get_segments_felzenszwalb(np.asarray(x_value, np.float64), dilation_rad=0)
    footprint = disk(DILATION_RADIUS)
    return [_dilate_in_box(mask, footprint, DILATION_RADIUS) for mask in masks]


def _dilate_in_box(mask: np.ndarray, footprint: np.ndarray, radius: int) -> np.ndarray:
    """``skimage.morphology.dilation(mask, footprint)`` computed on the mask's bounding box grown
    by ``radius + 1``: outside it the result is False, and inside it the crop's reflected border
    (the default mode) only mirrors pixels that are False, as over the whole image."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return np.zeros_like(mask)
    pad = radius + 1
    r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, mask.shape[0])
    c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, mask.shape[1])
    out = np.zeros_like(mask)
    out[r0:r1, c0:c1] = dilation(mask[r0:r1, c0:c1], footprint=footprint)
    return out


def rank_regions(attr: np.ndarray, masks: list[np.ndarray], area_threshold: float = 1.0,
                 min_pixel_diff: int = MIN_PIXEL_DIFF) -> tuple[np.ndarray, np.ndarray]:
    """XRAI's greedy region ranking, ``saliency.core.XRAI._xrai`` exactly: repeatedly add the
    segment whose not yet covered pixels have the highest mean attribution (ties: the first
    segment), until ``area_threshold`` of the image is covered; returns each pixel's region gain
    and region rank (1 = added first after sorting by gain, as ``flatten_xrai_segments``).

    ``saliency`` tests every remaining segment with full-image mask operations, ~150 segments per
    step for ~150 steps. Here each segment's count and sum of uncovered pixels are kept up to date
    by subtracting the pixels each step covers (one sparse column slice; every pixel once in all),
    and only the leaders are re-scored with ``saliency``'s own expression, so the choice and every
    gain are bit-identical to its result (the running sums' rounding differs in the last bits)."""
    attr = np.asarray(attr, np.float64)
    if not np.isfinite(attr).all():
        raise ValueError(f"XRAI cannot rank regions of an attribution with {np.size(attr) - np.isfinite(attr).sum()} "
                         f"non-finite values (NaN or inf): the model's gradients overflowed")
    if min_pixel_diff < 1:
        raise ValueError(f"min_pixel_diff must be >= 1, got {min_pixel_diff}")
    flat_attr = attr.ravel()
    masks = [np.asarray(m, bool) for m in masks]
    members = _membership(masks, flat_attr.size).tocsc()  # column slices below
    counts = np.asarray(members.sum(axis=1)).ravel()
    sums = members @ flat_attr
    slack = 1e-6 * max(float(np.abs(flat_attr).max(initial=0.0)), np.finfo(np.float64).tiny)
    alive = np.ones(len(masks), bool)
    covered = np.zeros(attr.shape, bool)
    output = np.full(attr.shape, -np.inf)
    trace: list[tuple[np.ndarray, float]] = []
    while covered.mean() <= area_threshold:
        alive &= counts >= min_pixel_diff
        if not alive.any():
            break
        approx = np.where(alive, sums / np.maximum(counts, 1), -np.inf)
        free = ~covered
        leaders = np.flatnonzero(approx >= approx.max() - slack)
        gains = [attr[masks[i] & free].mean() for i in leaders]
        best = int(leaders[int(np.argmax(gains))])  # argmax: the first of equal gains, as saliency
        gain = float(np.max(gains))
        added = masks[best] & free
        trace.append((added, gain))
        covered |= masks[best]
        output[added] = gain
        alive[best] = False
        newly = np.flatnonzero(added.ravel())
        taken = members[:, newly]
        counts -= np.asarray(taken.sum(axis=1)).ravel()
        sums -= taken @ flat_attr[newly]
    uncomputed = output == -np.inf
    output[uncomputed] = attr[uncomputed].mean() if uncomputed.any() else -np.inf
    ordered = [m for m, _ in sorted(trace, key=lambda t: -t[1])] + ([uncomputed] if uncomputed.any() else [])
    ranks = np.zeros(attr.shape, int)
    for i, mask in enumerate(ordered):
        ranks[mask] = i + 1
    return output, ranks


def _membership(masks: list[np.ndarray], pixels: int) -> sparse.csr_matrix:
    """The segments-by-pixels 0/1 matrix of ``masks`` (each flattened), float64."""
    rows, columns = (np.nonzero(np.stack([np.asarray(m, bool).ravel() for m in masks])) if masks else
                     (np.zeros(0, int),) * 2)
    return sparse.csr_matrix((np.ones(len(rows)), (rows, columns)), shape=(len(masks), pixels))


def region_means(masks: list[np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A linear summary of what XRAI reads an attribution through: each segment's mean
    attribution per channel (``[S, C]`` from ``[H, W, C]``, or a stack of them at once; an empty segment's is 0), for the IG
    core's ``map_features``. A proxy: XRAI ranks segments by the mean of the channels' maximum over
    the pixels each one adds to those already chosen, which no linear summary is; but an error that
    averages out within the segments hardly moves those means, and refining the path for it buys
    little. Every segment weighs the same in the relative L1 estimate, large or small, and the
    estimate's calibration was made on pixels (:func:`explain.integrated_gradients._map_error`):
    the default target on this summary was chosen by the overlap it buys (``make bench``, section 2)."""
    if not masks:
        raise ValueError("XRAI needs at least one segment")
    pixels = np.size(masks[0])
    members = _membership(masks, pixels)
    counts = np.maximum(np.asarray(members.sum(axis=1)).ravel(), 1)
    means = (sparse.diags(1.0 / counts) @ members).astype(np.float32).tocsr()

    def summarize(vectors: np.ndarray) -> np.ndarray:
        """``[S, C]`` of one attribution ``[H, W, C]``, or ``[k, S, C]`` of ``[k, H, W, C]`` in one product."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim not in (3, 4) or vectors.shape[-3] * vectors.shape[-2] != pixels:
            raise ValueError(f"region means need an attribution [H, W, C] or a stack [k, H, W, C] of "
                             f"{pixels} pixels, got shape {vectors.shape}")
        if vectors.ndim == 3:
            return summarize(vectors[None])[0]
        k, channels = len(vectors), vectors.shape[-1]
        columns = np.moveaxis(vectors, 0, -1).reshape(pixels, channels * k)  # pixel by (channel, point)
        return np.asarray(means @ columns, np.float32).reshape(-1, channels, k).transpose(2, 0, 1)

    return summarize


class XRAI:
    """XRAI (https://arxiv.org/abs/1906.02825) over a given IG attribution."""

    def __init__(self, area_threshold: float = 1.0):
        self._area_threshold = area_threshold

    def GetMask(self, x_value: np.ndarray, base_attribution: np.ndarray,
                segments: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Region attribution ``[H, W]`` (each pixel gets its region's gain) and region ranks
        ``[H, W]`` (1 = most important) for image ``x_value`` ``[H, W, C]``, given the IG
        attribution ``[H, W, C]`` (averaged over the baselines); ``segments`` from :func:`segment`.
        Channels merge by their maximum, as ``saliency``'s XRAI does."""
        attr = np.asarray(base_attribution, np.float64)
        if attr.ndim > 2:
            attr = attr.max(axis=-1)
        output, ranks = rank_regions(attr, segments if segments is not None else segment(x_value),
                                     self._area_threshold)
        return output.astype(np.float32), ranks

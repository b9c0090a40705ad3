"""XRAI region attributions from precomputed Integrated Gradients.

XRAI: Kapishnikov et al. 2019, https://arxiv.org/abs/1906.02825. The region algorithm (multi-scale
Felzenszwalb segmentation, then regions ranked greedily by attribution gain) is
``saliency.core.XRAI``'s; its own IG path (one Python call per step, per baseline) is replaced by
our batched IG for the black and white baselines, passed in through ``base_attribution``.
"""

from __future__ import annotations

import trainer  # noqa: F401  (saliency imports TensorFlow)

import numpy as np
from saliency import core as saliency_core
from saliency.core.xrai import _get_segments_felzenszwalb
from skimage.morphology import dilation, disk


#: ``saliency``'s default dilation radius of each segment (its ``_get_segments_felzenszwalb``).
DILATION_RADIUS = 5


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


def _no_model_calls(*args, **kwargs):
    raise AssertionError("XRAI was given its base attribution; it must not call the model")


class XRAI:
    """XRAI (https://arxiv.org/abs/1906.02825) over a given IG attribution."""

    def __init__(self, algorithm: str = "full", area_threshold: float = 1.0):
        self._xrai = saliency_core.XRAI()
        self._algorithm = algorithm
        self._area_threshold = area_threshold

    def GetMask(self, x_value: np.ndarray, base_attribution: np.ndarray,
                segments: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Region attribution ``[H, W]`` (each pixel gets its region's gain) and region ranks
        ``[H, W]`` (1 = most important) for image ``x_value`` ``[H, W, C]``, given the IG
        attribution ``[H, W, C]`` (averaged over the baselines); ``segments`` from :func:`segment`."""
        parameters = saliency_core.XRAIParameters(algorithm=self._algorithm, area_threshold=self._area_threshold,
                                                  return_xrai_segments=True, flatten_xrai_segments=True)
        result = self._xrai.GetMaskWithDetails(np.asarray(x_value, np.float64), _no_model_calls,
                                               base_attribution=np.asarray(base_attribution, np.float64),
                                               segments=segments if segments is not None else segment(x_value),
                                               extra_parameters=parameters)
        return result.attribution_mask.astype(np.float32), result.segments

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


def segment(x_value: np.ndarray) -> list[np.ndarray]:
    """XRAI's multi-scale Felzenszwalb segments of an image (``saliency``'s own segmentation);
    computed once per image and reused for every class explained."""
    return _get_segments_felzenszwalb(np.asarray(x_value, np.float64))


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

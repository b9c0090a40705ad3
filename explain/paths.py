"""Integration paths from a baseline to an input, in NumPy.

``linear``: the straight line ``b + alpha (x - b)`` of Integrated Gradients.
``scale_space``: Blur IG (Xu et al. 2020, https://arxiv.org/abs/2004.03383), the path
``blur(x, sigma_max (1 - alpha))`` from the maximally blurred image to the input, along which no
new information (no feature absent from the input) is introduced.

The blur is a Gaussian applied in the Fourier domain to the image mirrored at its borders
(identical to ``scipy.ndimage.gaussian_filter(mode="reflect")`` with an unbounded kernel); that
gives the exact derivative along the path, d/dsigma of blur = -4 pi^2 sigma |f|^2 times the
blurred spectrum, instead of the finite differences ``saliency.core.BlurIG`` takes, and the
TensorFlow kernel in :mod:`explain.model` computes the very same points.
"""

from __future__ import annotations

import numpy as np

LINEAR = "linear"
SCALE_SPACE = "scale_space"


def frequency_squared(height: int, width: int) -> np.ndarray:
    """|f|^2 on the ``rfft2`` grid of the mirrored ``[2H, 2W]`` image, in cycles per pixel."""
    fy = np.fft.fftfreq(2 * height)[:, None]
    fx = np.fft.rfftfreq(2 * width)[None, :]
    return (fy ** 2 + fx ** 2).astype(np.float32)


def _mirrored_spectrum(images: np.ndarray) -> np.ndarray:
    """``[..., H, W, C]`` to the ``rfft2`` of each channel mirrored to ``[2H, 2W]``."""
    x = np.moveaxis(np.asarray(images, np.float32), -1, -3)  # [..., C, H, W]
    x = np.concatenate([x, x[..., ::-1, :]], axis=-2)
    x = np.concatenate([x, x[..., ::-1]], axis=-1)
    return np.fft.rfft2(x)


def gaussian_blur(images: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """Blur ``[..., H, W, C]`` images with a Gaussian of standard deviation ``sigma`` pixels
    (a scalar, or one per leading index), reflecting at the borders."""
    images = np.asarray(images, np.float32)
    height, width = images.shape[-3:-1]
    sigma = np.asarray(sigma, np.float32)
    sigma = sigma.reshape(sigma.shape + (1, 1, 1))  # over [C, 2H, W+1]
    spectrum = _mirrored_spectrum(images) * np.exp(-2 * np.pi ** 2 * sigma ** 2 * frequency_squared(height, width))
    blurred = np.fft.irfft2(spectrum, s=(2 * height, 2 * width))[..., :height, :width]
    return np.moveaxis(blurred, -3, -1).astype(np.float32)


def path_points(inputs: np.ndarray, baselines: np.ndarray, alphas: np.ndarray, path: str = LINEAR,
                max_blur_sigma: float = 0.0) -> np.ndarray:
    """The points at ``alphas[i]`` on the paths from ``baselines[i]`` to ``inputs[i]``."""
    alphas = np.asarray(alphas, np.float32)
    if path == LINEAR:
        a = alphas.reshape(-1, 1, 1, 1)
        return (baselines + a * (inputs - baselines)).astype(np.float32)
    if path == SCALE_SPACE:
        return gaussian_blur(inputs, max_blur_sigma * (1.0 - alphas))
    raise ValueError(f"unknown path {path!r}; one of {LINEAR!r}, {SCALE_SPACE!r}")

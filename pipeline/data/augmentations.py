"""Faster equivalents of Albumentations transforms, used under the same names in `conf/aug` (transform_class looks here
first): the same parameters, the same random draws, the same output to within one level of 255.

- FancyPCA: Albumentations' computes the image's colour covariance and applies its noise in float64 over every pixel,
  4.6 ms of CPU for one 224×224 image here — more than every other step of `aug=heavy` together. Here the covariance
  comes from six float32 dot products and the noise is one 3×4 colour matrix applied by OpenCV: 0.65 ms.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np

MAX_PIXEL = 255.0


class FancyPCA(A.FancyPCA):
    """Albumentations' FancyPCA (Krizhevsky et al. 2012, as Albumentations defines it: each pixel moves by
    V·diag(α·λ)·(pixel − mean), V and λ the eigenvectors and eigenvalues of the image's colour covariance), computed
    faster for uint8 RGB images; other images go through Albumentations' own code."""

    def apply(self, img: np.ndarray, alpha_vector: np.ndarray, **params: Any) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            return super().apply(img, alpha_vector, **params)
        mean = np.asarray(cv2.mean(img)[:3])  # per channel, 0–255
        # One contiguous row per channel, centred: each covariance entry is one dot product of two rows (a matrix
        # product of the 3 × N rows took 6× longer here, and may start BLAS threads in a loader worker).
        channels = np.stack(cv2.split(img)).reshape(3, -1).astype(np.float32)
        channels -= mean.astype(np.float32)[:, np.newaxis]
        products = np.empty((3, 3))
        for i in range(3):
            for j in range(i, 3):
                products[i, j] = products[j, i] = np.dot(channels[i], channels[j])
        # Albumentations' np.cov, on the 0–1 scale (ddof 1): the eigenvalues scale the noise.
        covariance = products / (channels.shape[1] - 1) / MAX_PIXEL**2
        values, vectors = np.linalg.eigh(covariance)
        order = values[::-1].argsort()
        values, vectors = values[order], vectors[:, order]
        move = vectors @ np.diag(alpha_vector * values)  # pixel' = pixel + move · (pixel − mean): linear, any scale
        matrix = np.hstack([np.eye(3) + move, -(move @ mean)[:, np.newaxis]])
        return cv2.transform(img, matrix)  # rounded and clipped to 0–255, as Albumentations' float result is


FASTER = {"FancyPCA": FancyPCA}

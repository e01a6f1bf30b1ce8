"""Faster equivalents of Albumentations transforms, used under the same names in `conf/aug` (transform_class looks here
first): the same parameters, the same random draws, the same output to within one level of 255.

- FancyPCA: Albumentations' computes the image's colour covariance and applies its noise in float64 over every pixel,
  4.6 ms of CPU for one 224×224 image here — more than every other step of `aug=heavy` together. Here the covariance
  comes from six float32 dot products and the noise is one 3×4 colour matrix applied by OpenCV: 0.65 ms.
- Resize: an image already at the output size passes through untouched; Albumentations' copies it unchanged after its
  per-call work. Every pipeline ends with a Resize to the model's input, and images held in memory are resized to it
  once (pipeline.data.datamodule): with both, `aug=affine` takes 90 µs a digit instead of 109 µs.
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


class Resize(A.Resize):
    """Albumentations' Resize, but an image that already has the output size is returned as it is. Only for a Resize
    that always applies (p=1): one that may be skipped draws from its generator on every call, and keeps drawing."""

    def __call__(self, *args: Any, force_apply: bool = False, **data: Any) -> Any:
        if not args and self.p >= 1.0 and not self.replay_mode and self._at_size(data):
            self.params = {}
            return data
        return super().__call__(*args, force_apply=force_apply, **data)

    def _at_size(self, data: dict[str, Any]) -> bool:
        arrays = [value for value in data.values() if isinstance(value, np.ndarray)]
        return bool(arrays) and all(array.shape[:2] == (self.height, self.width) for array in arrays)


FASTER: dict[str, type[A.BasicTransform]] = {"FancyPCA": FancyPCA, "Resize": Resize}

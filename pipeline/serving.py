"""What the served generator answers: images for a request, or a BadRequest that says what is wrong with it.

Two forms of request body (MLflow's scoring server passes `inputs` on as arrays):

- noise: `{"inputs": {"noise": [[...latent_dim numbers], ...]}}` (or `{"inputs": [[...], ...]}`), plus
  `"label": [c, ...]` (one class 0-9 per row) for a conditional generator: the generator's own output,
  float32 NHWC images in [-1, 1];
- convenience: `{"inputs": {"n": 16, "seed": 3}}`, plus `"label": c` for a conditional generator (one
  class for all; without it the classes cycle 0-9): `n` uint8 NHWC images in [0, 255], from the same noise
  for the same seed, so a client needs no knowledge of the latent space.

No MLflow here: pipeline/registry.py wraps `answer` in the MLflow model, turning a BadRequest into a 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import pandas as pd

from pipeline.images import to_uint8
from pipeline.models import NUM_CLASSES, balanced_labels, fixed_noise, generate, is_conditional, latent_dim_of

NOISE_KEYS = ("noise", "label")
CONVENIENCE_KEYS = ("n", "seed", "label")


class BadRequest(ValueError):
    """A request the generator cannot answer; the message says what to send instead."""


def answer(generator: keras.Model, request: Any, max_images: int) -> np.ndarray:
    """Returns the images that `request` (either form, as MLflow parsed it) asks `generator` for."""
    request = _as_mapping(request)
    if "n" in request:
        return _convenience(generator, request, max_images)
    if "noise" in request:
        return _from_noise(generator, request, max_images)
    raise BadRequest(f"expected {{'noise': [[...{latent_dim_of(generator)} numbers], ...]}} or "
                     f"{{'n': count, 'seed': integer}} as inputs, got the keys {sorted(request)}")


def _as_mapping(request: Any) -> Mapping[str, Any]:
    """Returns the request as {key: value}: a bare array is noise, a one-row table a convenience request."""
    if isinstance(request, pd.DataFrame):
        if len(request) != 1 or not set(request.columns) <= set(CONVENIENCE_KEYS):
            raise BadRequest("send noise as {'inputs': {'noise': [[...], ...]}}; a table (dataframe_split or "
                             f"dataframe_records) can only be one row of {', '.join(CONVENIENCE_KEYS)}")
        return {key: request[key].iloc[0] for key in request.columns}
    if isinstance(request, Mapping):
        return request
    return {"noise": request}


def _from_noise(generator: keras.Model, request: Mapping[str, Any], max_images: int) -> np.ndarray:
    _only(request, NOISE_KEYS)
    latent_dim = latent_dim_of(generator)
    noise = np.asarray(request["noise"])
    if noise.dtype.kind not in "iuf" or noise.ndim != 2 or noise.shape[1] != latent_dim:
        raise BadRequest(f"noise: expected rows of {latent_dim} numbers (shape (N, {latent_dim})), "
                         f"got {_describe(noise)}")
    _check_count("noise rows", len(noise), max_images)
    noise = noise.astype(np.float32)
    if not np.isfinite(noise).all():
        raise BadRequest("noise: every value must be a finite number")
    labels = None
    if "label" in request:
        labels = np.asarray(request["label"])
        if labels.ndim == 2 and labels.shape[1] == 1:  # a column, as the logged generator's input example has it
            labels = labels[:, 0]
        labels = _labels(generator, labels)
        if labels.shape != (len(noise),):
            raise BadRequest(f"label: expected one class per noise row ({len(noise)}), got {_describe(labels)}")
    return generate(generator, noise, labels)


def _convenience(generator: keras.Model, request: Mapping[str, Any], max_images: int) -> np.ndarray:
    _only(request, CONVENIENCE_KEYS)
    count = _integer(request, "n")
    _check_count("n", count, max_images)
    seed = _integer(request, "seed") if "seed" in request else 0
    if seed < 0:
        raise BadRequest(f"seed: expected an integer >= 0, got {seed}")
    labels = None
    if "label" in request:
        labels = _labels(generator, np.full(count, _integer(request, "label")))
    elif is_conditional(generator):
        labels = balanced_labels(count)
    return to_uint8(generate(generator, fixed_noise(seed, count, latent_dim_of(generator)), labels))


def _only(request: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(request) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown input {unknown[0]!r}; this form takes {', '.join(allowed)}")


def _integer(request: Mapping[str, Any], key: str) -> int:
    value = np.asarray(request[key])
    if value.ndim != 0 or value.dtype.kind not in "iu":
        raise BadRequest(f"{key}: expected one integer, got {_describe(value)}")
    return int(value)


def _check_count(what: str, count: int, max_images: int) -> None:
    if not 1 <= count <= max_images:
        raise BadRequest(f"{what}: {count} images asked for; allowed: 1 to {max_images} per request")


def _labels(generator: keras.Model, labels: np.ndarray) -> np.ndarray:
    if not is_conditional(generator):
        raise BadRequest("label: this generator is not conditional; leave the label out")
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise BadRequest(f"label: expected integer classes, got {_describe(labels)}")
    if labels.size and not ((labels >= 0) & (labels < NUM_CLASSES)).all():
        raise BadRequest(f"label: classes are 0 to {NUM_CLASSES - 1}")
    return labels.astype(np.int32)


def _describe(value: np.ndarray) -> str:
    kind = {"i": "integers", "u": "integers", "f": "numbers", "b": "booleans", "U": "text", "S": "text"}
    return f"{kind.get(value.dtype.kind, value.dtype.name)} of shape {value.shape}"

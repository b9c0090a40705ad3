"""Served models: fetched to local disk, loaded lazily once per version, shared by all threads.

Loading a SavedModel takes seconds, so nothing loads until a version is first asked for, and two
requests arriving together for a cold version wait on one load rather than doing two. The serving
input name is read from ``saved_model.pb`` alone (no graph loaded), so requests are checked before
the model is even in memory.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import tensorflow as tf

from serving.instances import RequestError
from trainer.data import tf_error_reason
from trainer.export import read_signature_defs
from trainer.schema import SERVING_INPUT, SERVING_SIGNATURE


def fetch_model(uri: str, cache_dir: str | os.PathLike) -> str:
    """A local directory holding the model at ``uri``: a local path as is, anything with a scheme
    (``gs://``, ``file://``) copied with ``tf.io.gfile`` into ``cache_dir`` (once per URI)."""
    if "://" not in uri:
        if not Path(uri).is_dir():
            raise FileNotFoundError(f"model directory {uri} does not exist")
        return uri
    uri = uri.rstrip("/")
    target = Path(cache_dir) / _cache_name(uri)
    done = target / ".complete"
    if done.exists():
        return str(target)
    if not tf.io.gfile.isdir(uri):
        raise FileNotFoundError(f"model directory {uri} does not exist or is not a directory")
    for directory, _, files in tf.io.gfile.walk(uri):
        relative = directory[len(uri):].lstrip("/")
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            tf.io.gfile.copy(posixpath.join(directory, name), str(target / relative / name), overwrite=True)
    done.touch()  # written last: a crash mid-copy is retried, never served half-copied
    return str(target)


def _cache_name(uri: str) -> str:
    """The directory under the cache that holds a fetched copy of ``uri``."""
    return hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def serving_input_name(model_dir: str) -> str:
    """The single input of the SavedModel's ``serving_default`` signature (``bytes_inputs``)."""
    signature = read_signature_defs(model_dir).get(SERVING_SIGNATURE)
    if signature is not None and len(signature.inputs) == 1:
        return next(iter(signature.inputs))
    return SERVING_INPUT


@dataclass
class ServedModel:
    """One model version ready to serve: its Vertex resource and local directory; the SavedModel's
    ``serving_default`` (what Vertex itself runs for ``:predict``) and the explainable model (for
    ``:explain``) are each loaded on first use."""

    version: dict[str, Any]
    model_dir: str
    input_name: str
    _saved: Any = field(default=None, repr=False)
    _signature: Any = field(default=None, repr=False)
    _explainable: Any = field(default=None, repr=False)
    _labels: list[str] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def loaded(self) -> bool:
        return self._saved is not None

    def _saved_model(self) -> Any:
        """The SavedModel, loaded once (call with the lock held): ``:predict`` and ``:explain``
        share its variables, so a version costs one load and one copy of its weights."""
        if self._saved is None:
            self._saved = tf.saved_model.load(self.model_dir)
        return self._saved

    def signature(self) -> Any:
        """The ``serving_default`` concrete function (bytes -> probabilities), loaded once."""
        if self._signature is None:
            with self._lock:
                if self._signature is None:
                    self._signature = self._saved_model().signatures[SERVING_SIGNATURE]
        return self._signature

    def explainable(self) -> Any:
        """``explain.load_explainable_model`` of this version, loaded once."""
        if self._explainable is None:
            with self._lock:
                if self._explainable is None:
                    from explain import load_explainable_model

                    self._explainable = load_explainable_model(self.model_dir, loaded=self._saved_model())
        return self._explainable

    @property
    def labels(self) -> list[str]:
        if self._labels is None:
            from trainer.export import output_count, read_labels

            self._labels = read_labels(self.model_dir, output_count(self.signature()))
        return self._labels

    def predict(self, images: list[bytes]) -> np.ndarray:
        """Class probabilities ``[N, C]`` from ``serving_default``. Images passed
        :mod:`serving.instances`, so a decode failure here is rare (a file PIL reads but TensorFlow
        does not); it is then found and named like any other bad instance."""
        function = self.signature()
        try:
            return _single_output(function(**{self.input_name: tf.constant(images)}))
        except tf.errors.InvalidArgumentError:
            for i, image in enumerate(images):
                try:
                    function(**{self.input_name: tf.constant([image])})
                except tf.errors.InvalidArgumentError as e:
                    raise RequestError(f"instances[{i}]: the model cannot decode this image: "
                                       f"{tf_error_reason(e)}") from e
            raise


def _single_output(outputs: dict[str, tf.Tensor]) -> np.ndarray:
    (value,) = outputs.values()
    return value.numpy()


class ModelCache:
    """Served models keyed by model version (and artifact URI), created once, thread-safe.

    With ``deployed`` (a callable returning the ``(model name, version id)`` pairs deployed right
    now, e.g. :meth:`serving.registry.Registry.deployed_versions`) the cache keeps only those: each
    time a version is loaded, versions no longer deployed are dropped, with their fetched copies.
    A server left running through weekly retrains otherwise keeps every version it ever served in
    memory (measured: +278 MB per retrain of the MobileNetV2 model).
    """

    def __init__(self, cache_dir: str | os.PathLike,
                 deployed: Callable[[], Iterable[tuple[str, str]]] | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self._deployed = deployed
        self._models: dict[tuple[str, str, str], ServedModel] = {}
        self._lock = threading.Lock()

    def get(self, version: dict[str, Any]) -> ServedModel:
        key = (version["name"], version["versionId"], version["artifactUri"])
        with self._lock:  # fetching is per version and rare; one lock keeps it simple and exact
            served = self._models.get(key)
            if served is None:
                self._prune_locked(keep=key)  # before loading: the old one's memory goes first
                model_dir = fetch_model(version["artifactUri"], self.cache_dir)
                served = ServedModel(version, model_dir, serving_input_name(model_dir))
                self._models[key] = served
            return served

    def keys(self) -> list[tuple[str, str, str]]:
        """(model name, version id, artifact URI) of every cached version."""
        with self._lock:
            return list(self._models)

    def prune(self) -> list[tuple[str, str, str]]:
        """Drop the versions that are no longer deployed; returns their keys."""
        with self._lock:
            return self._prune_locked()

    def _prune_locked(self, keep: tuple[str, str, str] | None = None) -> list[tuple[str, str, str]]:
        if self._deployed is None:
            return []
        deployed = set(self._deployed())
        dropped = [key for key in self._models if key != keep and key[:2] not in deployed]
        for key in dropped:
            del self._models[key]  # the SavedModel is freed with its last reference
            uri = key[2]
            if "://" in uri:  # a fetched copy (local directories are the registry's, never ours)
                shutil.rmtree(Path(self.cache_dir) / _cache_name(uri), ignore_errors=True)
        return dropped

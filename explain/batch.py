"""Bulk explanations on one machine, written exactly as Vertex's BatchPredictionJob writes them.

``python -m explain.batch --input=DATA --output_dir=OUT --model_dir=MODEL`` (or ``make batch-explain``)
runs the exported model over a folder, a glob, TFRecords or Vertex JSONL instances (local or
``gs://``) and writes what a BatchPredictionJob running the project's serving container writes
into its ``prediction-<model>-<time>/`` directory:

* ``prediction.results-NNNNN-of-MMMMM``: one JSON line per instance,
  ``{"instance": ..., "key": ..., "prediction": {"probabilities", "label", "labelIndex",
  "explanation": {"attributions": [...]}}}``, the prediction exactly as the container's
  ``AIP_PREDICT_ROUTE`` answers it (:mod:`serving.app`), so one reader serves both engines;
* ``prediction.errors_stats-NNNNN-of-MMMMM``: one JSON line per unusable instance,
  ``{"instance": ..., "key": ..., "error": {"status": "INVALID_ARGUMENT", "message": why}}``
  (Vertex's ``PredictionResult`` with its ``error``).

Why it is shaped this way:

* Resumable: record ``i`` belongs to shard ``i // shard_size``; a shard is written to temporary
  files and renamed when complete (errors file first, results file last, so the results file is
  the "done" mark). A rerun with the same OUTPUT skips finished shards (their records are read but
  not decoded) and checks, in ``batch_explain.json``, that input and settings are the same. That
  manifest is renamed into place too, so a kill -9 never leaves half of one.
* One writer at a time: on a local OUTPUT a second process is refused while the first holds an
  advisory ``flock`` on the directory (released by the kernel when its holder dies, even by
  kill -9), and the holder sweeps the temporary files a killed run left. ``gs://`` (and a FUSE
  mount such as ``/gcs``) has no such lock: there every writer's temporary files carry their own
  random name, and each run re-reads the manifest before committing a shard, so two runs with the
  same settings at once only duplicate work (each shard renamed into place is complete), and one
  with other settings stops, saying why. Temporary files a killed ``gs://`` run left stay (hidden,
  never read).
* Fast: the IG core batches all path steps of a call; several images go to each call, and a
  reader thread reads and decodes the next batch while the model works on this one (TensorFlow
  already uses every core for one model call, so one process is the right number).
* Never fatal for one record: a bad record goes to the errors file with its key and the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import posixpath
import queue
import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import fire
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from explain.batch_io import (Record, Source, b64_instance, check_image, count_records, read_records,
                              resolve_input)
from explain.parameters import DEFAULT_ADAPTIVE_START
from trainer.data import tf_error_reason

RESULTS_PREFIX = "prediction.results"
ERRORS_PREFIX = "prediction.errors_stats"
MANIFEST_FILE = "batch_explain.json"
#: The suffix of every temporary file (see :func:`_temp_name`).
TEMP_SUFFIX = ".tmp"
#: What the serving container uses when neither the model nor the request gives parameters.
DEFAULT_PARAMETERS: dict[str, Any] = {
    "integrated_gradients_attribution": {"step_count": DEFAULT_ADAPTIVE_START}}
_METHODS = {"ig": "integrated_gradients_attribution", "xrai": "xrai_attribution"}
#: Images per model call: IG multiplies each image by its path steps, predictions alone do not.
EXPLAIN_BATCH, PREDICT_BATCH = 8, 64
#: Batches decoded ahead of the model (bounded: memory stays flat on a million images).
_PREFETCH = 2


class BatchResumeError(ValueError):
    """OUTPUT holds a run with other input or settings: resuming it would mix two runs."""


def shard_name(prefix: str, shard: int, num_shards: int) -> str:
    """``prediction.results-00003-of-00010``: Vertex's (and Beam's) shard naming."""
    return f"{prefix}-{shard:05d}-of-{num_shards:05d}"


def _join(directory: str, name: str) -> str:
    return posixpath.join(directory, name) if "://" in directory else os.path.join(directory, name)


def prediction_of(probabilities: np.ndarray, labels: list[str],
                  explanation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One prediction as the serving container returns it (``serving.app``'s custom-container mode)."""
    best = int(np.argmax(probabilities))
    out: dict[str, Any] = {"probabilities": [float(p) for p in probabilities], "label": labels[best],
                           "labelIndex": best}
    if explanation is not None:
        out["explanation"] = {"attributions": explanation["attributions"]}
        if explanation.get("warnings"):
            out["explanation"]["warnings"] = list(explanation["warnings"])
    return out


@dataclass
class _Batch:
    """Records of one shard, in order; ``good`` indexes those with decoded ``pixels`` (or ``images``)."""

    shard: int
    records: list[Record]
    errors: dict[int, str] = field(default_factory=dict)
    good: list[int] = field(default_factory=list)
    pixels: np.ndarray | None = None


class Engine:
    """The loaded model and the work on one batch: decode (reader thread), predict/explain (main
    thread). Made by :func:`explain_batch`, or once by a caller running several batches (a benchmark)."""

    def __init__(self, model_dir: str, explain: bool, parameters: Mapping[str, Any] | None) -> None:
        self.explain = explain
        self.parameters = parameters
        if explain:
            from explain.model import load_explainable_model

            self.model = load_explainable_model(model_dir)
            self.labels = self.model.labels
        else:
            from trainer.export import read_labels
            from trainer.schema import SERVING_SIGNATURE

            self.signature = tf.saved_model.load(model_dir).signatures[SERVING_SIGNATURE]
            self.input_name = next(iter(self.signature.structured_input_signature[1]))
            self.labels = read_labels(model_dir)

    def prepare(self, batch: _Batch) -> None:
        """Decode in the reader thread: find bad images now, so the model thread only computes."""
        images = []
        for i, record in enumerate(batch.records):
            if record.error is None:
                reason = check_image(record.image)
                if reason:
                    batch.errors[i] = reason
                    continue
                batch.good.append(i)
                images.append(record.image)
            else:
                batch.errors[i] = record.error
        if self.explain and images:
            try:
                batch.pixels = self.model.preprocess(images)
            except ValueError:  # PIL read it, the graph cannot: find and report each such record
                kept, rows = [], []
                for i, image in zip(list(batch.good), images):
                    try:
                        rows.append(self.model.preprocess([image])[0])
                        kept.append(i)
                    except ValueError as e:
                        batch.errors[i] = str(e).replace("instance 0: ", "")
                batch.good = kept
                batch.pixels = np.stack(rows) if rows else None

    def run(self, batch: _Batch) -> list[dict[str, Any]]:
        """Predictions (with explanations) of the good records, in order."""
        if not batch.good:
            return []
        if self.explain:
            from explain.explainer import explain_images

            probabilities = self.model.predict(batch.pixels)
            explanations = explain_images(self.model, batch.pixels, self.parameters, probabilities=probabilities)
            return [prediction_of(p, self.labels, e) for p, e in zip(probabilities, explanations)]
        images = [batch.records[i].image for i in batch.good]
        try:
            outputs = self.signature(**{self.input_name: tf.constant(images)})
            probabilities = next(iter(outputs.values())).numpy()
        except tf.errors.InvalidArgumentError:
            return self._one_by_one(batch, images)
        return [prediction_of(p, self.labels) for p in probabilities]

    def _one_by_one(self, batch: _Batch, images: list[bytes]) -> list[dict[str, Any]]:
        kept, predictions = [], []
        for i, image in zip(list(batch.good), images):
            try:
                outputs = self.signature(**{self.input_name: tf.constant([image])})
            except tf.errors.InvalidArgumentError as e:
                batch.errors[i] = f"the model cannot decode this image: {tf_error_reason(e)}"
                continue
            kept.append(i)
            predictions.append(prediction_of(next(iter(outputs.values())).numpy()[0], self.labels))
        batch.good = kept
        return predictions


def _batches(source: Source, shard_size: int, batch_size: int, done: set[int]) -> Iterator[_Batch]:
    """Records grouped by shard, at most ``batch_size`` per batch; finished shards are skipped."""
    current: _Batch | None = None
    for index, record in enumerate(read_records(source)):
        shard = index // shard_size
        if shard in done:
            continue
        if current is not None and (current.shard != shard or len(current.records) >= batch_size):
            yield current
            current = None
        if current is None:
            current = _Batch(shard, [])
        current.records.append(record)
    if current is not None:
        yield current


def _prefetched(batches: Iterator[_Batch], engine: Engine) -> Iterator[_Batch]:
    """``batches`` read and decoded in a background thread, ``_PREFETCH`` ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=_PREFETCH)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for batch in batches:
                engine.prepare(batch)
                while not stop.is_set():
                    try:
                        q.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
            q.put(e)

    thread = threading.Thread(target=produce, name="batch-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class _ShardWriter:
    """Lines of one shard in temporary files, renamed into place when the shard is complete."""

    def __init__(self, output_dir: str, shard: int, num_shards: int) -> None:
        self.results = _join(output_dir, shard_name(RESULTS_PREFIX, shard, num_shards))
        self.errors = _join(output_dir, shard_name(ERRORS_PREFIX, shard, num_shards))
        self._tmp = [_temp_name(p) for p in (self.results, self.errors)]
        self._files = [tf.io.gfile.GFile(p, "w") for p in self._tmp]
        self.num_results = self.num_errors = 0

    def result(self, line: dict[str, Any]) -> None:
        self._files[0].write(json.dumps(line) + "\n")
        self.num_results += 1

    def error(self, line: dict[str, Any]) -> None:
        self._files[1].write(json.dumps(line) + "\n")
        self.num_errors += 1

    def commit(self) -> None:
        for f in self._files:
            f.write("")  # GFile creates its file on the first write: an empty shard still gets one
            f.close()
        tf.io.gfile.rename(self._tmp[1], self.errors, overwrite=True)
        tf.io.gfile.rename(self._tmp[0], self.results, overwrite=True)  # last: marks the shard done


def _temp_name(path: str) -> str:
    """A hidden temporary name beside ``path``, this writer's alone (Vertex's readers and ours
    glob ``prediction.*``, so they never see it)."""
    directory, name = (posixpath if "://" in path else os.path).split(path)
    return _join(directory, f".{name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def _filesystem_type(path: str) -> str:
    """The type of the filesystem ``path`` is on, from ``/proc/self/mounts`` ("" if unknown)."""
    path, best, kind = os.path.realpath(path), "", ""
    with contextlib.suppress(OSError), open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].encode().decode("unicode_escape") if len(fields) > 2 else ""
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, kind = point, fields[2]
    return kind


@contextlib.contextmanager
def _single_writer(output_dir: str) -> Iterator[bool]:
    """Refuse a second process on a local ``output_dir`` while one writes it, and sweep the
    temporary files of killed writers (none can be live: every writer holds the lock while it
    has any). Yields whether the lock is held: not on ``gs://``, nor on a FUSE mount such as
    Cloud Storage FUSE's ``/gcs`` (a lock there binds one machine only, and sweeping could delete
    another machine's live files), nor where the filesystem refuses ``flock``."""
    if "://" in output_dir or _filesystem_type(output_dir).startswith("fuse"):
        yield False
        return
    directory = os.open(output_dir, os.O_RDONLY)  # the lock is on the directory: no file in Vertex's layout
    try:
        try:
            fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise BatchResumeError(f"{output_dir} is being written by another process: wait for it to finish "
                                   f"(then rerun to resume) or use another --output_dir") from None
        except OSError as e:
            print(f"{output_dir}: cannot lock it ({e}); going on without keeping other writers out", flush=True)
            locked = False
        orphans = [n for n in os.listdir(output_dir) if n.startswith(".") and n.endswith(TEMP_SUFFIX)] if locked else []
        for name in orphans:  # no writer can be live while the lock is held
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(output_dir, name))
        yield locked
    finally:
        os.close(directory)  # releases the lock (as the kernel does when a holder dies)


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key.split("://", 1)[-1]).strip("_")[-150:] or "instance"


def _write_figure(figure_dir: str, key: str, pixels: np.ndarray, prediction: dict[str, Any]) -> None:
    from explain.visualization import decode_jpeg_b64, save_explanation_figure

    attribution = prediction["explanation"]["attributions"][0]
    mask = decode_jpeg_b64(next(iter(attribution["featureAttributions"].values()))["b64_jpeg"])
    title = (f"{key}: {attribution['outputDisplayName']} ({attribution['instanceOutputValue']:.2f}), "
             f"approximation error {attribution['approximationError']:.3f}")
    name = _safe_name(key) + ".png"
    if "://" not in figure_dir:
        save_explanation_figure(pixels, mask, os.path.join(figure_dir, name), title)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = save_explanation_figure(pixels, mask, os.path.join(tmp, name), title)
        tf.io.gfile.copy(local, posixpath.join(figure_dir, name), overwrite=True)


def _manifest(input: str, source: Source, num_records: int, shard_size: int, explain: bool,
              parameters: Mapping[str, Any] | None, resolved: Mapping[str, Any] | None,
              model_dir: str) -> dict[str, Any]:
    files = "\n".join(source.files).encode()
    return {"input": input, "kind": source.kind, "num_files": len(source.files),
            "files_sha256": hashlib.sha256(files).hexdigest(), "num_records": num_records,
            "shard_size": shard_size, "explain": explain, "parameters": parameters,
            "resolved_parameters": resolved, "model_dir": model_dir}


#: The manifest keys a resume must match (``model_dir`` may move: the same model, copied elsewhere).
_RESUME_KEYS = ("files_sha256", "num_records", "shard_size", "explain", "parameters", "resolved_parameters")


def _check_resume(output_dir: str, manifest: dict[str, Any]) -> None:
    """Refuse to resume a run with other input or settings; write the manifest of a new run.

    The manifest is renamed into place, never overwritten: where no lock keeps a second writer
    out (``gs://``, shared mounts), of two runs started at once the second rename fails and that
    run compares with the first's manifest instead, and the manifest is read back, so a run only
    goes on under its own settings."""
    path = _join(output_dir, MANIFEST_FILE)
    if not tf.io.gfile.exists(path):
        tmp = _temp_name(path)  # renamed into place: a kill never leaves half a manifest
        with tf.io.gfile.GFile(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
        try:
            tf.io.gfile.rename(tmp, path, overwrite=False)
        except tf.errors.AlreadyExistsError:  # another run wrote one first: compare with it
            tf.io.gfile.remove(tmp)
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    try:
        previous = json.loads(data)
    except ValueError as e:  # not JSON, or not UTF-8
        raise BatchResumeError(
            f"{path} is not valid JSON ({e}); it records which input and settings the shards in {output_dir} "
            f"were written with, so they cannot be resumed safely: use a new --output_dir") from None
    if not isinstance(previous, dict):
        raise BatchResumeError(f"{path} holds {type(previous).__name__}, not a run's manifest: use a new --output_dir")
    for key in _RESUME_KEYS:
        if key not in previous:
            raise BatchResumeError(
                f"{output_dir} holds a run from an earlier version that did not record its {key}: whether its "
                f"defaults were today's cannot be told, and resuming could mix two runs: use a new --output_dir")
        if previous[key] != manifest[key]:
            raise BatchResumeError(
                f"{output_dir} holds a run with another {key} ({previous[key]!r}, now {manifest[key]!r}); "
                f"resuming would mix two runs: use a new --output_dir")


def explain_batch(input: str, output_dir: str, model_dir: str, parameters: Mapping[str, Any] | None = None,
                  explain: bool = True, shard_size: int = 64, batch_size: int | None = None, figures: bool = False,
                  key_only: bool = False, progress: bool = True, engine: Engine | None = None) -> dict[str, Any]:
    """Predict (and, with ``explain``, explain) every instance of ``input`` into ``output_dir`` in
    Vertex's batch-prediction layout; resumes a run killed in the middle.

    Args:
      input: a folder, a glob or files (comma separated), local or gs://: images, TFRecords in the
        lab's schema, or Vertex JSONL instances (``{"bytes_inputs": {"b64": ...}}`` per line).
      parameters: Vertex ExplanationParameters (default: IG refined to 0.05 from 5 steps, as the container).
      shard_size: instances per output shard (the unit of resumption).
      batch_size: images per model call (all their IG path steps are batched together); default
        8 when explaining, 64 for predictions alone (serving_default is most efficient on large batches).
      figures: also write the lab's three-panel figure per instance to ``output_dir/figures``.
      key_only: leave the instance (its base64 image) out of each line; the ``key`` still names it.
      engine: an already loaded :class:`Engine` for ``model_dir`` with the same explain/parameters.

    Returns counts: shards, shards skipped as already done, results and errors written this run.
    """
    batch_size = batch_size or (EXPLAIN_BATCH if explain else PREDICT_BATCH)
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    if explain:
        from explain.parameters import parse_explanation_parameters

        parameters = dict(parameters or DEFAULT_PARAMETERS)
        # bad parameters fail before any model work; what they resolve to (the product's defaults
        # filled in) goes into the manifest, so a run resumed under other defaults cannot mix
        resolved = json.loads(json.dumps(dataclasses.asdict(parse_explanation_parameters(parameters))))
    else:
        parameters = resolved = None
    started = time.perf_counter()
    source = resolve_input(input, exclude=output_dir)
    num_records = count_records(source)
    num_shards = max(1, -(-num_records // shard_size))
    tf.io.gfile.makedirs(output_dir)
    with _single_writer(output_dir) as locked:  # one writer at a time; a killed one's temporary files swept
        manifest = _manifest(input, source, num_records, shard_size, explain, parameters, resolved, model_dir)
        _check_resume(output_dir, manifest)
        done = {s for s in range(num_shards)
                if tf.io.gfile.exists(_join(output_dir, shard_name(RESULTS_PREFIX, s, num_shards)))}
        figure_dir = _join(output_dir, "figures")
        if figures and explain:
            tf.io.gfile.makedirs(figure_dir)
        summary = {"output_dir": output_dir, "num_records": num_records, "num_shards": num_shards,
                   "skipped_shards": len(done), "written_shards": 0, "results": 0, "errors": 0}
        if len(done) == num_shards:
            print(f"{output_dir}: all {num_shards} shards already done")
            summary["seconds"] = round(time.perf_counter() - started, 3)
            return summary

        engine = engine or Engine(model_dir, explain, parameters)
        done_records = sum(min(shard_size, num_records - s * shard_size) for s in done)
        writer: _ShardWriter | None = None
        writer_shard = -1

        def commit(shard_writer: _ShardWriter) -> None:
            if not locked:  # another run may have started on this output since: never commit into it
                _check_resume(output_dir, manifest)
            shard_writer.commit()
            summary["written_shards"] += 1
            summary["results"] += shard_writer.num_results
            summary["errors"] += shard_writer.num_errors

        with tqdm(total=num_records, initial=done_records, desc="explaining" if explain else "predicting",
                  unit="instance", disable=not progress) as bar:
            for batch in _prefetched(_batches(source, shard_size, batch_size, done), engine):
                if writer is not None and writer_shard != batch.shard:
                    commit(writer)
                    writer = None
                if writer is None:
                    writer, writer_shard = _ShardWriter(output_dir, batch.shard, num_shards), batch.shard
                predictions = dict(zip(batch.good, engine.run(batch)))
                rows = {i: row for row, i in enumerate(batch.good)}
                for i, record in enumerate(batch.records):
                    line: dict[str, Any] = {}
                    if not key_only:
                        line["instance"] = record.instance if record.instance is not None else (
                            b64_instance(record.image) if record.image is not None else {"key": record.key})
                    line["key"] = record.key
                    if i in predictions:
                        line["prediction"] = predictions[i]
                        writer.result(line)
                        if figures and explain:
                            _write_figure(figure_dir, record.key, batch.pixels[rows[i]], predictions[i])
                    else:
                        line["error"] = {"status": "INVALID_ARGUMENT", "message": batch.errors.get(i, "not predicted")}
                        writer.error(line)
                bar.update(len(batch.records))
            if writer is not None:
                commit(writer)
        summary["seconds"] = round(time.perf_counter() - started, 3)
        return summary


def main(input: str, output_dir: str, model_dir: str, method: str = "ig",
         step_count: int = DEFAULT_ADAPTIVE_START,
         parameters: str | dict | None = None, predict_only: bool = False, shard_size: int = 64,
         batch_size: int | None = None, figures: bool = False, key_only: bool = False) -> str:
    """Bulk predictions with explanations in Vertex's batch-prediction output layout (resumable).

    Args:
      input: folder, glob or files (comma separated; local or gs://): images, TFRecords or JSONL instances.
      output_dir: where prediction.results-* and prediction.errors_stats-* go; rerun to resume.
      model_dir: the exported model (trainer.export).
      method: ig or xrai (ignored when --parameters is given).
      step_count: path steps to start from (refinement adds steps until the error is at most 0.05;
        XRAI starts from at least 17).
      parameters: full Vertex ExplanationParameters as JSON (overrides method and step_count).
      predict_only: predictions without explanations (serving_default).
      shard_size: instances per output shard.
      batch_size: images per model call (default 8 explaining, 64 predicting).
      figures: also write a three-panel figure per instance to OUTPUT/figures.
      key_only: omit the instance's base64 image from each output line.
    """
    if isinstance(parameters, str) and parameters:
        parameters = json.loads(parameters)
    if not parameters:
        if method not in _METHODS:
            raise ValueError(f"--method must be one of {sorted(_METHODS)}, got {method!r}")
        parameters = {_METHODS[method]: {"step_count": step_count}}
    summary = explain_batch(input, output_dir, model_dir, parameters, explain=not predict_only,
                            shard_size=shard_size, batch_size=batch_size, figures=figures, key_only=key_only)
    return json.dumps(summary)


if __name__ == "__main__":
    fire.Fire(main)

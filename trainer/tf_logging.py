"""Keep TensorFlow's C++ start-up noise off a new user's console (overridable).

On a machine without a GPU, the CUDA build of TensorFlow prints dozens of lines while it loads
("Unable to register cuDNN factory", "computation placer already registered", "failed call to
cuInit"), none of which a user can act on, and they bury the progress and results the demo
prints. ``TF_CPP_MIN_LOG_LEVEL=3`` silences what TensorFlow logs once its logging is set up, but
the plugin registrations are written by absl before that, straight to file descriptor 2, so the
first ``import tensorflow`` runs with fd 2 captured and only lines that are not known start-up
noise are written back. Set ``TF_CPP_MIN_LOG_LEVEL`` yourself (e.g. ``0``) to see everything.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
import threading
from typing import Iterator

#: Start-up lines that say nothing actionable on a CPU machine.
NOISE = re.compile(
    r"Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|"
    r"All log messages before absl::InitializeLog\(\) is called|failed call to cuInit|"
    r"oneDNN custom operations are on|This TensorFlow binary is optimized to use available CPU|"
    r"To enable the following instructions|Could not find cuda drivers|TF-TRT Warning|"
    # written at INFO, before absl's logging is set up, whenever a graph is frozen or a session
    # first runs (explain.folding, explain.sessions): the level does not reach them
    r"Number of eligible GPUs|single_machine\.cc.*Starting new session|MLIR V1 optimization pass is not enabled")


_MARKER = "FLOWERS_QUIET_TF_LEVEL"


def filter_noise(text: str) -> str:
    """``text`` without the known start-up noise lines."""
    return "".join(line for line in text.splitlines(keepends=True) if not NOISE.search(line))


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of ``tensorflow`` with fd 2 captured, then replays what is not noise."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with _filtered_fd2():
            self._loader.exec_module(module)


#: One capture of fd 2 for the process, however many threads are in a filtered block: each
#: saving and restoring fd 2 on its own, a thread that entered during another's capture saved
#: that capture's file as the console, and restored fd 2 to it (deleted) for good.
_capture_lock = threading.Lock()
_capture: dict = {"holders": 0, "saved": None, "file": None}


@contextlib.contextmanager
def _filtered_fd2() -> Iterator[None]:
    """File descriptor 2 captured while the block runs, then what is not noise written back: the
    first thread in captures, the last one out restores fd 2 and writes back what all wrote."""
    with _capture_lock:
        if not _capture["holders"]:
            sys.stderr.flush()
            _capture["file"] = tempfile.TemporaryFile(mode="w+b")
            _capture["saved"] = os.dup(2)
            os.dup2(_capture["file"].fileno(), 2)
        _capture["holders"] += 1
    try:
        yield
    finally:
        with _capture_lock:
            _capture["holders"] -= 1
            if not _capture["holders"]:
                sys.stderr.flush()
                os.dup2(_capture["saved"], 2)
                os.close(_capture["saved"])
                with _capture["file"] as capture:
                    capture.seek(0)
                    kept = filter_noise(capture.read().decode("utf-8", "replace"))
                if kept:
                    sys.stderr.write(kept)
                    sys.stderr.flush()


@contextlib.contextmanager
def native_noise_filtered() -> Iterator[None]:
    """The known native noise of the block (:data:`NOISE`) kept off the console, when the log
    level is ours (:func:`quiet_tensorflow`); a level the user set shows everything. Everything
    else the block writes to fd 2, from any thread, is written back when it ends."""
    ours = os.environ.get(_MARKER)
    if ours is None or os.environ.get("TF_CPP_MIN_LOG_LEVEL") != ours:
        yield
        return
    with _filtered_fd2():
        yield


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the first ``import tensorflow``, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow() -> None:
    """Default ``TF_CPP_MIN_LOG_LEVEL`` to 3 and filter the import-time noise, unless the user set
    the level or TensorFlow is already imported."""
    # A level we set ourselves is inherited by subprocesses (pipeline steps, bench workers),
    # which should be quiet too; a level the user set is theirs.
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if (level is not None and os.environ.get(_MARKER) != level) or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ[_MARKER] = "3"
    if not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())

"""Training: determinism, resume after a kill, bad input caught before training, fine-tuning
(the session's trained classifier, its accuracy and its export: test_trained_classifier.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import trainer  # noqa: F401

import pytest

from trainer.data import DataError
from trainer.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_training_is_deterministic_for_a_seed(sample_data, small_backbone_dir, tmp_path):
    kwargs = dict(train_data_path=sample_data["train_pattern"], eval_data_path=sample_data["eval_pattern"],
                  hub_handle=small_backbone_dir, batch_size=16, num_epochs=2, seed=7, verbose=0)
    a = train_and_evaluate(output_dir=str(tmp_path / "a"), **kwargs)
    b = train_and_evaluate(output_dir=str(tmp_path / "b"), **kwargs)
    assert a["loss"] == b["loss"] and a["confusion_matrix"] == b["confusion_matrix"]


def test_bad_data_fails_before_training(sample_data, small_backbone_dir, tmp_path):
    common = dict(output_dir=str(tmp_path / "out"), hub_handle=small_backbone_dir, num_epochs=1, verbose=0)
    with pytest.raises(DataError, match="nothing/here"):
        train_and_evaluate(train_data_path=str(tmp_path / "nothing/here/*.tfrec"),
                           eval_data_path=sample_data["eval_pattern"], **common)
    with pytest.raises(DataError):  # one_hot_class has 5 entries, the head 3
        train_and_evaluate(train_data_path=sample_data["train_pattern"], eval_data_path=sample_data["eval_pattern"],
                           classes="a,b,c", **common)
    assert not os.path.exists(tmp_path / "out" / "keras_model")


def test_fine_tuning_trains_end_to_end(sample_data, backbone_dir, tmp_path):
    metrics = train_and_evaluate(train_data_path=sample_data["train_pattern"],
                                 eval_data_path=sample_data["eval_pattern"], output_dir=str(tmp_path / "ft"),
                                 hub_handle=backbone_dir, batch_size=16, num_epochs=1, train_examples=32,
                                 fine_tune_layers=2, verbose=0)
    assert metrics["cached_features"] is False and metrics["fine_tune_layers"] == 2
    assert os.path.exists(tmp_path / "ft" / "keras_model" / "saved_model.pb")


def test_resume_after_kill(sample_data, small_backbone_dir, tmp_path):
    """Kill a run after its second epoch's checkpoint; the rerun resumes instead of starting over."""
    out = tmp_path / "resume"
    cmd = [sys.executable, "-m", "trainer.train", f"--train_data_path={sample_data['train_pattern']}",
           f"--eval_data_path={sample_data['eval_pattern']}", f"--output_dir={out}", f"--hub_handle={small_backbone_dir}",
           "--batch_size=16", "--num_epochs=40", "--train_examples=800", "--verbose=2"]
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.time() + 240
    for line in proc.stdout:  # "Epoch 3/40" is printed once epoch 2's checkpoint is written
        seen.append(line)
        if line.startswith("Epoch 3/40") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(line.startswith("Epoch 3/40") for line in seen), "".join(seen[-30:])
    assert not (out / "keras_model").exists()

    rerun = subprocess.run(cmd[:-3] + ["--num_epochs=4", "--train_examples=32", "--verbose=2"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    epochs_run = [line for line in rerun.stdout.splitlines() if line.startswith("Epoch ")]
    assert epochs_run[0].startswith("Epoch 3/4"), epochs_run  # resumed after the two finished epochs
    assert (out / "keras_model" / "saved_model.pb").exists()

"""TensorFlow's native noise kept off a user's console (trainer.tf_logging)."""

import os

from trainer import tf_logging

GRAPPLER = ("I0000 00:00:1796045627.067697   10308 devices.cc:67] Number of eligible GPUs (core count >= 8, "
            "compute capability >= 0.0): 0\n"
            "I0000 00:00:1796045627.067863   10308 single_machine.cc:374] Starting new session\n")


def test_the_noise_a_frozen_graph_prints_is_dropped_and_everything_else_written_back(capfd, monkeypatch):
    """Freezing a graph (explain.folding, explain.sessions) makes grappler print start-up lines
    at INFO before absl's logging is set up, which the log level does not reach: they are dropped,
    and anything else written to fd 2 meanwhile still reaches the console."""
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv(tf_logging._MARKER, "3")
    with tf_logging.native_noise_filtered():
        os.write(2, GRAPPLER.encode())
        os.write(2, b"a real error\n")
    assert capfd.readouterr().err == "a real error\n"


def test_a_log_level_the_user_set_shows_everything(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.setenv(tf_logging._MARKER, "3")
    with tf_logging.native_noise_filtered():
        os.write(2, GRAPPLER.encode())
    assert capfd.readouterr().err == GRAPPLER

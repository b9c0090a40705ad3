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


def test_threads_filtering_at_once_leave_the_console_as_it_was(capfd, monkeypatch):
    """Two lanes making their first session at once both filter: the one that entered second must
    not take the first one's capture for the console (it restored fd 2 to a deleted file, and all
    later output was lost), and what each wrote that is not noise still arrives."""
    import threading

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv(tf_logging._MARKER, "3")
    console = os.fstat(2).st_ino
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with tf_logging.native_noise_filtered():
            os.write(2, GRAPPLER.encode() + b"from the first\n")
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with tf_logging.native_noise_filtered():
            b_in.set()
            a_out.wait(10)  # the first leaves while the second is still in
            os.write(2, b"from the second\n")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert os.fstat(2).st_ino == console
    os.write(2, b"afterwards\n")
    assert capfd.readouterr().err == "from the first\nfrom the second\nafterwards\n"

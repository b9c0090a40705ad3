"""The split step: one pattern of records into training and evaluation sets by record hash."""

import os

import pytest


def _records(pattern: str) -> list[bytes]:
    import tensorflow as tf

    from trainer.data import list_files

    return list(tf.data.TFRecordDataset(list_files(pattern)).as_numpy_iterator())


def test_split_is_disjoint_deterministic_and_stable_when_data_grows(sample_data, tmp_path):
    import trainer  # noqa: F401

    from components.split_data import eval_side, split_records

    everything = os.path.dirname(os.path.dirname(sample_data["train_pattern"])) + "/*/*.tfrec"
    first = split_records(everything, str(tmp_path / "a"), eval_percent=20)
    train, evaluation = _records(first["train_data_path"]), _records(first["eval_data_path"])
    assert sorted(train + evaluation) == sorted(_records(everything))  # nothing lost, nothing doubled
    assert not set(train) & set(evaluation)
    assert 0.1 < len(evaluation) / (len(train) + len(evaluation)) < 0.3  # ~20% of 310 records
    assert all(eval_side(r, 20) for r in evaluation) and not any(eval_side(r, 20) for r in train)

    again = split_records(everything, str(tmp_path / "b"), eval_percent=20)  # the same run again
    assert sorted(_records(again["eval_data_path"])) == sorted(evaluation)
    # New data arrives (only the training half here, as a stand-in): old records keep their side.
    grown = split_records(sample_data["train_pattern"], str(tmp_path / "c"), eval_percent=20)
    assert set(_records(grown["eval_data_path"])) <= set(evaluation)
    assert set(_records(grown["train_data_path"])) <= set(train)


def test_split_refuses_bad_percentages_and_empty_sides(sample_data, tmp_path):
    from components.split_data import split_records

    with pytest.raises(ValueError, match="eval_percent"):
        split_records(sample_data["eval_pattern"], str(tmp_path / "x"), eval_percent=0)
    with pytest.raises(ValueError, match="no files match|matches no|not found|No files"):
        split_records(str(tmp_path / "none" / "*.tfrec"), str(tmp_path / "y"), eval_percent=20)

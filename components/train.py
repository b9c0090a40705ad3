"""Step 1, train: ``trainer.train.train_and_evaluate`` as a pipeline step.

On the ``vertex`` target the KFP wrapper of this step runs as a Vertex custom training job
(``create_custom_training_job_from_component``), so the same function trains locally and in the cloud.
"""

from __future__ import annotations

from typing import Any

import fire


def train(train_data_path: str, eval_data_path: str, output_dir: str, hub_handle: str, batch_size: int = 32,
          num_epochs: int = 15, learning_rate: float = 1e-3, fine_tune_layers: int = 0, seed: int = 42,
          train_examples: int = 0) -> dict[str, Any]:
    """Train into ``output_dir`` (``keras_model/``, ``metrics.json``, figures); returns the metrics."""
    from trainer.train import train_and_evaluate

    return train_and_evaluate(train_data_path=train_data_path, eval_data_path=eval_data_path, output_dir=output_dir,
                              hub_handle=hub_handle, batch_size=batch_size, num_epochs=num_epochs,
                              learning_rate=learning_rate, fine_tune_layers=fine_tune_layers, seed=seed,
                              train_examples=train_examples or None, verbose=2)


if __name__ == "__main__":
    fire.Fire(train, serialize=lambda m: f"accuracy {m['accuracy']:.4f}")

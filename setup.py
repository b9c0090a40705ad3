"""The trainer package as Vertex AI custom training wants it: ``python setup.py sdist``.

Only ``trainer`` ships: it is what runs in the training container. The development environment
pins everything in requirements.lock; these are the trainer's own runtime needs on top of the
TensorFlow that the training image provides.
"""

from setuptools import setup

setup(
    name="flowers_trainer",
    version="0.2.0",
    description="Explainable flowers image classifier: training and export with XAI signatures.",
    packages=["trainer"],
    python_requires=">=3.10",
    install_requires=[
        "fire==0.7.1",
        "tensorflow-hub==0.16.1",
        "tf-keras==2.19.0",
        "matplotlib==3.11.2",
        "pillow==13.0.0",
        "tqdm==4.70.1",
    ],
)

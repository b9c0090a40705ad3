"""Local Vertex AI: a model registry on disk (:mod:`serving.registry`) and a server speaking Vertex's
prediction REST API (:mod:`serving.app`, ``python -m serving``), so the official SDK, the pipeline
and the custom prediction container all run offline against the same resources."""

"""The KFP pipeline: definition (wiring only), compile, submit, schedule and an offline run."""

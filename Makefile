# Explainable flowers classifier: `make help` lists every target.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3.11
VENV        ?= .venv
PY          := $(VENV)/bin/python
RUN         := PYTHONPATH=$(CURDIR) PYTHONUNBUFFERED=1 $(PY)
CONFIG      ?= configs/local.yaml
VERTEX_CONFIG ?= configs/vertex.yaml
# test processes: the suite is mostly one core busy at a time (waiting on servers, subprocesses)
TEST_WORKERS ?= 2

DATA_DIR    ?= data/sample
BACKBONE    ?= models/backbone
RUN_DIR     ?= runs/demo
EXPORT_DIR  ?= $(RUN_DIR)/model
NUM_TRAIN   ?= 600
NUM_EVAL    ?= 150
EPOCHS      ?= 15
REGISTRY    ?= local_registry
PORT        ?= 8080
IMAGES      ?=
OUT         ?= data/converted
INPUT       ?= $(DATA_DIR)/validation/*.tfrec
OUTPUT      ?= $(RUN_DIR)/batch_explanations

help: ## List every target with what it does
	@grep -hE '^[a-zA-Z0-9_.-]+:.*?## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.lock
	@command -v $(PYTHON_BOOT) >/dev/null || { echo "Python 3.11 is required ($(PYTHON_BOOT) not found)"; exit 1; }
	$(PYTHON_BOOT) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.lock
	touch $@

venv: $(VENV)/.installed ## Create .venv and install the pinned requirements (requirements.lock)

lock: ## Re-resolve requirements.in into requirements.lock (needs the network)
	rm -rf /tmp/lock-venv && $(PYTHON_BOOT) -m venv /tmp/lock-venv && /tmp/lock-venv/bin/pip install -q --upgrade pip
	/tmp/lock-venv/bin/pip install -q -r requirements.in && /tmp/lock-venv/bin/pip freeze --exclude pip > requirements.lock

data: venv ## Write the synthetic sample flowers (TFRecords + masks + samples.png) to DATA_DIR
	$(RUN) -m trainer.synthetic --output_dir=$(DATA_DIR) --num_train=$(NUM_TRAIN) --num_eval=$(NUM_EVAL) --seed=42

convert: venv ## Convert an image folder (IMAGES=dir with one sub-folder per class) to TFRecords in OUT
	@test -n "$(IMAGES)" || { echo "Set IMAGES to a folder with one sub-folder per class, e.g. make convert IMAGES=flower_photos"; exit 2; }
	$(RUN) -m trainer.convert --input_dir='$(IMAGES)' --output_dir='$(OUT)' --seed=42

backbone: venv ## Build (once; cached by recipe) MobileNetV2 1.0 @ 192 offline, in TF Hub format, pre-trained on synthetic flowers
	$(RUN) -m trainer.backbone --output_dir=$(BACKBONE)

train: data backbone ## Train the classifier on DATA_DIR into RUN_DIR (cached backbone features)
	$(RUN) -m trainer.train --train_data_path='$(DATA_DIR)/train/*.tfrec' \
	  --eval_data_path='$(DATA_DIR)/validation/*.tfrec' --output_dir=$(RUN_DIR) \
	  --hub_handle=$(BACKBONE) --batch_size=32 --num_epochs=$(EPOCHS) --seed=42

export: venv ## Export RUN_DIR's model with serving_default, xai_preprocess and xai_model signatures
	$(RUN) -m trainer.export --keras_model_dir=$(RUN_DIR)/keras_model --export_dir=$(EXPORT_DIR)

explain: venv ## Explain a few validation images with the exported model; figures in RUN_DIR/explanations
	$(RUN) -m trainer.samples --data_path='$(DATA_DIR)/validation/*.tfrec' --output_dir=$(RUN_DIR)/inputs --n=3
	$(RUN) -m explain --model_dir=$(EXPORT_DIR) --output_dir=$(RUN_DIR)/explanations $(RUN_DIR)/inputs/*.jpg

batch-explain: venv ## Explain every instance of INPUT (folder, glob, TFRecords or JSONL; local or gs://) into OUTPUT in Vertex's batch-prediction layout; rerun to resume
	$(RUN) -m explain.batch --input='$(INPUT)' --output_dir='$(OUTPUT)' --model_dir=$(EXPORT_DIR)

demo: data backbone ## The main job offline: sample data -> the whole local pipeline -> an explained prediction figure
	$(RUN) -m pipeline.run_local --config $(CONFIG)

compile: venv ## Write the pipeline spec for CONFIG to artifacts/flowers_pipeline.yaml
	$(RUN) -m pipeline.compile --config $(CONFIG)

pipeline-local: data backbone ## Run the whole pipeline offline with kfp.local (CONFIG, default configs/local.yaml)
	$(RUN) -m pipeline.run_local --config $(CONFIG)

pipeline: venv ## Submit the pipeline to Vertex AI Pipelines (VERTEX_CONFIG, default configs/vertex.yaml)
	$(RUN) -m pipeline.run_vertex submit --config $(VERTEX_CONFIG)

preflight: venv ## List what in VERTEX_CONFIG would stop a Vertex run (placeholders, paths Vertex cannot read)
	$(RUN) -m pipeline.preflight --config $(VERTEX_CONFIG)

schedule: venv ## Create or update the retraining schedule on Vertex AI (ACTION=pause|resume to pause or resume it)
	$(RUN) -m pipeline.run_vertex schedule --config $(VERTEX_CONFIG) $(if $(ACTION),--action $(ACTION))

image: venv ## Build and push the components and serving images with Cloud Build (needs gcloud)
	$(RUN) -m pipeline.image --config $(VERTEX_CONFIG)

compat: venv ## Check the exported model (EXPORT_DIR) loads and answers under TF 2.15, the prediction runtime
	$(RUN) -m pipeline.compat --model_dir $(EXPORT_DIR)

serve: venv ## Serve the local registry's endpoints (Vertex REST API) on 127.0.0.1:PORT
	$(RUN) -m serving --registry $(REGISTRY) --port $(PORT)

serve-model: venv ## Serve EXPORT_DIR alone behind every endpoint name on 127.0.0.1:PORT
	$(RUN) -m serving --model $(EXPORT_DIR) --port $(PORT)

test: venv ## Run the test suite (TEST_WORKERS processes, default 2)
	$(RUN) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: venv ## Run the benchmarks on this machine; writes BENCHMARKS.md, bench/results.json, bench/figures/
	$(RUN) -m bench

sdist: venv ## Build the trainer package as Vertex custom training wants it (dist/*.tar.gz)
	$(PY) setup.py -q sdist --formats=gztar

clean: ## Remove generated data, models, runs, builds and the virtual environments
	rm -rf data runs models artifacts outputs local_registry dist build *.egg-info .pytest_cache $(VENV) .venv-compat \
	  bench/.cache bench/results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: help venv lock data backbone train export explain batch-explain demo compile pipeline-local pipeline preflight schedule image compat serve serve-model test bench sdist clean

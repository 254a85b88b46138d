# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, build the embedded data, train the demo models, sample
#   make test   create .venv, install, run the default (fast) test suite
# GPU users choose their torch build, e.g. `make install TORCH="torch==2.13.0 --index-url <CUDA wheel index>"`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   := data/shards/shapes
# Demo length: the whole chain in about 14 min on 2 CPU cores from a fresh clone (AE ~0.7 s/step, txt2img ~1 s/step at
# batch 16 there); raise both for better models, e.g. `make demo AE_STEPS=2000 LDM_STEPS=3000`.
AE_STEPS  ?= 400
LDM_STEPS ?= 500

.PHONY: install data demo demo-autoencoder demo-txt2img demo-sample test test-all lint bench clean

install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

data: $(DATA)/manifest.json
$(DATA)/manifest.json: data/make_dataset.py | $(STAMP)
	$(BIN)/python data/make_dataset.py --out $(DATA)

demo: install data demo-autoencoder demo-txt2img demo-sample

demo-autoencoder: install data
	$(BIN)/python train.py experiment=autoencoder_kl trainer.max_steps=$(AE_STEPS)

demo-txt2img: install data
	$(BIN)/python train.py experiment=txt2img trainer.max_steps=$(LDM_STEPS)

demo-sample: install
	$(BIN)/python sample.py task=txt2img ckpt=outputs/txt2img/latest/model.safetensors \
		prompt_file=data/demo_prompts.txt n=2 steps=25 out_dir=outputs/samples/txt2img

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: install
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/bench_autoencoder.py
	$(BIN)/python bench/bench_unet.py
	$(BIN)/python bench/bench_sampling.py
	$(BIN)/python bench/bench_dataloader.py

clean:
	rm -rf outputs data/shards

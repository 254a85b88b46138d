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
LATENTS := data/shards/shapes_latents
EX     := $(DATA)/examples
AE     := outputs/autoencoder_kl/latest/model.safetensors
# Demo length: 9 min 59 s for the whole chain on 2 quiet CPU cores (outputs/demo_summary.md). Raise the steps for
# better models, e.g. `make demo AE_STEPS=2000 LDM_STEPS=5000 TASK_STEPS=2000`.
AE_STEPS   ?= 400
LDM_STEPS  ?= 1200
TASK_STEPS ?= 300
SAMPLE     := $(BIN)/python sample.py steps=25 seed=0

.PHONY: install install-eval data demo demo-autoencoder demo-latents demo-txt2img demo-tasks demo-sample demo-summary demo-eval test test-all lint bench clean

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

# The whole chain: autoencoder -> cached latents -> txt2img model -> class / semantic / superres models ->
# every sample.py task from those models.
demo: install data demo-autoencoder demo-latents demo-txt2img demo-tasks demo-sample demo-summary

demo-autoencoder: install data
	$(BIN)/python train.py experiment=autoencoder_kl trainer.max_steps=$(AE_STEPS)

# Latents and caption states computed once (stage 2 then runs neither the encoder nor the text encoder).
demo-latents: install data
	for split in train val; do $(BIN)/python -m ldm.data.cache_latents --ckpt $(AE) \
		--shards "$(DATA)/$$split-*.tar" --out $(LATENTS) --prefix $$split \
		--text-encoder default --text-max-length 32 || exit 1; done

demo-txt2img: install data
	$(BIN)/python train.py experiment=txt2img data=shapes_latents 'data.keys=[caption,caption_emb]' \
		trainer.max_steps=$(LDM_STEPS)

# Small models for the tasks a text model cannot serve (class ids, segmentation maps, low-res images).
demo-tasks: install data
	$(BIN)/python train.py experiment=class_cond data=shapes_latents 'data.keys=[label]' \
		trainer.max_steps=$(TASK_STEPS)
	$(BIN)/python train.py experiment=semantic data=shapes_latents 'data.keys=[segmap]' \
		trainer.max_steps=$(TASK_STEPS)
	$(BIN)/python train.py experiment=superres trainer.max_steps=$(TASK_STEPS)

demo-sample: install
	$(SAMPLE) task=txt2img ckpt=outputs/txt2img/latest/model.safetensors \
		prompt_file=data/demo_prompts.txt n=2 out_dir=outputs/samples/txt2img
	$(SAMPLE) task=img2img ckpt=outputs/txt2img/latest/model.safetensors image=$(EX)/image.png \
		'prompt=a large red circle on a blue background' strength=0.7 n=4 out_dir=outputs/samples/img2img
	$(SAMPLE) task=inpaint ckpt=outputs/txt2img/latest/model.safetensors image=$(EX)/image.png \
		mask=$(EX)/mask.png 'prompt=a large yellow star on a green background' n=4 out_dir=outputs/samples/inpaint
	$(SAMPLE) task=outpaint ckpt=outputs/txt2img/latest/model.safetensors image=$(EX)/image.png \
		'pad=[16,0,16,0]' prompt_file=$(EX)/caption.txt n=4 out_dir=outputs/samples/outpaint
	$(SAMPLE) task=uncond ckpt=outputs/txt2img/latest/model.safetensors n=8 out_dir=outputs/samples/uncond
	$(SAMPLE) task=class ckpt=outputs/class_cond/latest/model.safetensors 'label=[0,1,2,3,4]' n=2 \
		out_dir=outputs/samples/class
	$(SAMPLE) task=semantic ckpt=outputs/semantic/latest/model.safetensors segmap=$(EX)/segmap.png n=4 \
		out_dir=outputs/samples/semantic
	$(SAMPLE) task=superres ckpt=outputs/superres/latest/model.safetensors image=$(EX)/lowres.png n=4 \
		out_dir=outputs/samples/superres

# FID/KID with the standard Inception: torchvision from the same index as torch, then torch-fidelity.
# TORCH_INDEX: torch's wheel index for your build (cpu, cu128, ...); then download the weights file
# weights-inception-2015-12-05-6726825d.pth (torch-fidelity's v0.2.0 release) and pass EVAL_WEIGHTS=<it>.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
install-eval: install
	$(BIN)/pip install -q torchvision --index-url $(TORCH_INDEX) --no-deps
	$(BIN)/pip install -q --no-deps "torch-fidelity>=0.3"
	$(BIN)/python -c "import torchmetrics, torch_fidelity"   # fails loudly if torchvision does not match torch

# Scores of the demo models against the embedded validation set (outputs/eval/*.json + tables).
# EVAL_FEATURES=inception EVAL_WEIGHTS=<weights-inception-2015-12-05-6726825d.pth> for real FIDs.
EVAL_FEATURES ?= tiny
EVAL_WEIGHTS  ?=
EVAL := $(BIN)/python -m ldm.evaluate --reference '$(DATA)/val-*.tar' --features $(EVAL_FEATURES) \
	$(if $(EVAL_WEIGHTS),--inception-weights $(EVAL_WEIGHTS),)
demo-eval: install
	$(EVAL) --autoencoder $(AE) --out outputs/eval/autoencoder_kl.json
	$(EVAL) --generated outputs/samples/txt2img --out outputs/eval/txt2img.json
	$(EVAL) --checkpoint outputs/class_cond/latest/model.safetensors --labels 0 1 2 3 4 --n 40 --steps 25 \
		--out outputs/eval/class_cond.json
	$(EVAL) --superres outputs/superres/latest/model.safetensors --factor 4 --limit 50 --steps 25 \
		--out outputs/eval/superres.json
	$(BIN)/python -m ldm.evaluate --runs 'outputs/*/2*'

# What the demo produced, measured from its own run folders and samples: outputs/demo_summary.{md,json}.
demo-summary: install
	$(BIN)/python data/demo_summary.py --outputs outputs --out outputs/demo_summary

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
	$(BIN)/python bench/bench_finetune.py

clean:
	rm -rf outputs data/shards

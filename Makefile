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
EX     := $(DATA)/examples
# One folder per `make demo`: every stage writes its run there and the next stage reads that exact run (never an
# experiment's `latest`, which another run may move meanwhile). `make demo-<step> DEMO_DIR=outputs/demo/<stamp>`
# repeats one step of an earlier chain (a stage folder that exists is refused: delete it first); without DEMO_DIR
# the steps after demo-autoencoder use outputs/demo/latest, the newest chain's folder.
ifeq ($(origin DEMO_DIR),undefined)
ifneq ($(filter demo demo-autoencoder,$(MAKECMDGOALS)),)
DEMO_DIR := outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)
else
DEMO_DIR := outputs/demo/latest
endif
endif
AE      := $(DEMO_DIR)/autoencoder_kl/model.safetensors
LATENTS := $(DEMO_DIR)/latents
TXT2IMG := $(DEMO_DIR)/txt2img/model.safetensors
SAMPLES := $(DEMO_DIR)/samples
# Demo length: 10-31 min for the whole chain on 2 quiet CPU cores, by machine (outputs/demo_summary.md). Raise the steps for
# better models, e.g. `make demo AE_STEPS=2000 LDM_STEPS=5000 TASK_STEPS=2000 SR_STEPS=2000`.
AE_STEPS   ?= 400
LDM_STEPS  ?= 1200
TASK_STEPS ?= 300
# superres_pixel: pixel-space residual SR (no autoencoder); it needs more steps than the small task models
SR_STEPS   ?= 600
SAMPLE     := $(BIN)/python sample.py steps=25 seed=0
# train.py into $(DEMO_DIR)/<stage>, refusing a stage folder that already holds a run
TRAIN_INTO = test ! -e $(DEMO_DIR)/$(1) || { echo "error: $(DEMO_DIR)/$(1) exists: delete it or pass another DEMO_DIR" >&2; exit 2; }; \
	$(BIN)/python train.py paths.output_dir=$(DEMO_DIR)/$(1)
ON_LATENTS = data=shapes_latents first_stage_ckpt=$(AE) data.train_shards='$(LATENTS)/train-*.tar' \
	data.val_shards='$(LATENTS)/val-*.tar'

.PHONY: install install-eval data demo demo-autoencoder demo-latents demo-txt2img demo-tasks demo-sample demo-summary demo-eval test test-all lint bench clean

install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	# Debian's Chromium for tests/test_app_browser.py (skipped without it); never fails the install
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "chromium not installed: browser tests skip"
	touch $(STAMP)

data: $(DATA)/manifest.json
$(DATA)/manifest.json: data/make_dataset.py | $(STAMP)
	$(BIN)/python data/make_dataset.py --out $(DATA)

# The whole chain: autoencoder -> cached latents -> txt2img model -> class / semantic / superres models ->
# every sample.py task from those models.
demo: install data demo-autoencoder demo-latents demo-txt2img demo-tasks demo-sample demo-summary

demo-autoencoder: install data
	$(call TRAIN_INTO,autoencoder_kl) experiment=autoencoder_kl trainer.max_steps=$(AE_STEPS)
	mkdir -p outputs/demo && ln -sfn $(abspath $(DEMO_DIR)) outputs/demo/latest

# Latents and caption states computed once (stage 2 then runs neither the encoder nor the text encoder).
demo-latents: install data
	for split in train val; do $(BIN)/python -m ldm.data.cache_latents --ckpt $(AE) \
		--shards "$(DATA)/$$split-*.tar" --out $(LATENTS) --prefix $$split \
		--text-encoder default --text-max-length 32 || exit 1; done

demo-txt2img: install data
	$(call TRAIN_INTO,txt2img) experiment=txt2img $(ON_LATENTS) 'data.keys=[caption,caption_emb]' \
		trainer.max_steps=$(LDM_STEPS)

# Small models for the tasks a text model cannot serve (class ids, segmentation maps, low-res images; the
# super-resolution model works in pixel space on the bicubic upscale's residual, so it needs no autoencoder).
demo-tasks: install data
	$(call TRAIN_INTO,class_cond) experiment=class_cond $(ON_LATENTS) 'data.keys=[label]' \
		trainer.max_steps=$(TASK_STEPS)
	$(call TRAIN_INTO,semantic) experiment=semantic $(ON_LATENTS) 'data.keys=[segmap]' \
		trainer.max_steps=$(TASK_STEPS)
	$(call TRAIN_INTO,superres) experiment=superres_pixel trainer.max_steps=$(SR_STEPS)

demo-sample: install
	$(SAMPLE) task=txt2img ckpt=$(TXT2IMG) prompt_file=data/demo_prompts.txt n=2 out_dir=$(SAMPLES)/txt2img
	$(SAMPLE) task=img2img ckpt=$(TXT2IMG) image=$(EX)/image.png \
		'prompt=a large red circle on a blue background' strength=0.7 n=4 out_dir=$(SAMPLES)/img2img
	$(SAMPLE) task=inpaint ckpt=$(TXT2IMG) image=$(EX)/image.png \
		mask=$(EX)/mask.png 'prompt=a large yellow star on a green background' n=4 out_dir=$(SAMPLES)/inpaint
	$(SAMPLE) task=outpaint ckpt=$(TXT2IMG) image=$(EX)/image.png \
		'pad=[16,0,16,0]' prompt_file=$(EX)/caption.txt n=4 out_dir=$(SAMPLES)/outpaint
	$(SAMPLE) task=uncond ckpt=$(TXT2IMG) n=8 out_dir=$(SAMPLES)/uncond
	$(SAMPLE) task=class ckpt=$(DEMO_DIR)/class_cond/model.safetensors 'label=[0,1,2,3,4]' n=2 \
		out_dir=$(SAMPLES)/class
	$(SAMPLE) task=semantic ckpt=$(DEMO_DIR)/semantic/model.safetensors segmap=$(EX)/segmap.png n=4 \
		out_dir=$(SAMPLES)/semantic
	$(SAMPLE) task=superres ckpt=$(DEMO_DIR)/superres/model.safetensors image=$(EX)/lowres.png n=4 \
		out_dir=$(SAMPLES)/superres

# FID/KID with the standard Inception: torchvision from the same index as torch, then torch-fidelity.
# TORCH_INDEX: torch's wheel index for your build (cpu, cu128, ...); then download the weights file
# weights-inception-2015-12-05-6726825d.pth (torch-fidelity's v0.2.0 release) and pass EVAL_WEIGHTS=<it>.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
install-eval: install
	$(BIN)/pip install -q torchvision --index-url $(TORCH_INDEX) --no-deps
	$(BIN)/pip install -q --no-deps "torch-fidelity>=0.3"
	$(BIN)/python -c "import torchmetrics, torch_fidelity"   # fails loudly if torchvision does not match torch

# Scores of the demo models against the embedded validation set ($(DEMO_DIR)/eval/*.json + tables).
# EVAL_FEATURES=inception EVAL_WEIGHTS=<weights-inception-2015-12-05-6726825d.pth> for real FIDs.
EVAL_FEATURES ?= tiny
EVAL_WEIGHTS  ?=
EVAL := $(BIN)/python -m ldm.evaluate --reference '$(DATA)/val-*.tar' --features $(EVAL_FEATURES) \
	$(if $(EVAL_WEIGHTS),--inception-weights $(EVAL_WEIGHTS),)
demo-eval: install
	$(EVAL) --autoencoder $(AE) --out $(DEMO_DIR)/eval/autoencoder_kl.json
	$(EVAL) --generated $(SAMPLES)/txt2img --out $(DEMO_DIR)/eval/txt2img.json
	$(EVAL) --checkpoint $(DEMO_DIR)/class_cond/model.safetensors --labels 0 1 2 3 4 --n 40 --steps 25 \
		--out $(DEMO_DIR)/eval/class_cond.json
	$(EVAL) --superres $(DEMO_DIR)/superres/model.safetensors --factor 4 --limit 50 --steps 25 \
		--out $(DEMO_DIR)/eval/superres.json
	$(BIN)/python -m ldm.evaluate --runs $(addprefix $(DEMO_DIR)/,autoencoder_kl txt2img class_cond semantic superres)

# What the demo produced, measured from its own run folders and samples: $(DEMO_DIR)/summary.{md,json}, copied
# to outputs/demo_summary.{md,json}.
demo-summary: install
	$(BIN)/python data/demo_summary.py --demo $(DEMO_DIR) --sr-reference '$(DATA)/val-*.tar' --sr-limit 50
	cp $(DEMO_DIR)/summary.md outputs/demo_summary.md && cp $(DEMO_DIR)/summary.json outputs/demo_summary.json

# The sampling web page (python -m ldm.app): `make app CKPT=outputs/txt2img/latest/model.safetensors`;
# APP_ARGS="port=8000 device=cuda" passes more options (python -m ldm.app --help lists them).
CKPT ?= $(TXT2IMG)
.PHONY: app
app: install
	$(BIN)/python -m ldm.app ckpt=$(CKPT) $(APP_ARGS)

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

# imcap: `make demo` runs the main job on the built-in shapes dataset, `make test` the test suite.
# Both create the virtual environment .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-requirements
APP_STAMP := $(VENV)/.installed-requirements-app
TB_STAMP  := $(VENV)/.installed-requirements-tensorboard

.PHONY: install demo test lint clean-demo

# Re-installs only when requirements.txt changes. torch first, pinned to the release that pip takes
# from this machine's disk; on other machines it is an ordinary download.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

ATTENTION ?= soft
demo: $(STAMP)
	$(BIN)/python demo.py --attention $(ATTENTION) $(if $(SEED),--seed $(SEED))

# The demo, then self-critical training from its model (docs/scst.md, "Shapes").
.PHONY: demo-scst
demo-scst: $(STAMP)
	$(BIN)/python demo.py --scst

test: $(STAMP) $(APP_STAMP) $(TB_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean-demo:
	rm -rf data/raw/shapes data/processed/shapes model_files/shapes

# The web page (README, "Caption a photo"; docs/app.md): its libraries, from requirements-app.txt, are installed once.
# make app ARGS="--checkpoint model_files/<run>/best.pt --port 8000" passes options to app.py.
.PHONY: app
$(APP_STAMP): requirements-app.txt $(STAMP)
	$(BIN)/python -m pip install -q -r requirements-app.txt
	touch $(APP_STAMP)

app: $(APP_STAMP)
	$(BIN)/python app.py $(ARGS)

# TensorBoard (docs/training.md, "TensorBoard"), from requirements-tensorboard.txt, installed once: train.py
# --tensorboard logs to it, and `make tensorboard` shows every run under model_files/ that did (ARGS: its options).
.PHONY: tensorboard
$(TB_STAMP): requirements-tensorboard.txt $(STAMP)
	$(BIN)/python -m pip install -q -r requirements-tensorboard.txt
	touch $(TB_STAMP)

tensorboard: $(TB_STAMP)
	$(BIN)/tensorboard --logdir model_files $(ARGS)

# The released model (docs/model_card.md): Flickr8k in Karpathy's format -> make_dataset (224 px) -> feature cache
# and training -> val scores -> model_files/flickr8k_efficientnet_lite0.pt. It releases last.pt, the end of the
# cosine schedule, which beat best.pt (the best greedy BLEU-4) with beams 3 and 5 on val. F8K is the folder holding
# dataset_flickr8k.json and images/ (data/README.md); F8K_RUN names the training run (a new name for a second run).
F8K       ?= data/raw/flickr8k
F8K_RUN   ?= flickr8k_lite0
F8K_DATA  := data/processed/flickr8k
F8K_MODEL := --encoder efficientnet_lite0 --encoded-size 7 --cache-features --batch-size 16 --workers 1
F8K_TRAIN := $(F8K_MODEL) --group-captions --decoder-lr 8e-4 --lr-schedule cosine --epochs 10
.PHONY: flickr8k-model
flickr8k-model: $(STAMP)
	$(BIN)/python make_dataset.py --dataset flickr8k --karpathy-json $(F8K)/dataset_flickr8k.json \
		--image-dir $(F8K)/images --image-size 224 --output-dir $(F8K_DATA)
	$(BIN)/python train.py --data $(F8K_DATA) --run $(F8K_RUN) $(F8K_TRAIN)
	$(BIN)/python evaluate.py --checkpoint model_files/$(F8K_RUN)/last.pt --data $(F8K_DATA) --split val \
		--beam-sizes 1 3 5 --length-penalty 0.5
	$(BIN)/python release.py --checkpoint model_files/$(F8K_RUN)/last.pt \
		--scores model_files/$(F8K_RUN)/results_val.json --out model_files/flickr8k_efficientnet_lite0.pt

# Self-critical training (docs/scst.md): from the cross-entropy run above (its last.pt), four epochs with a
# CIDEr-D reward and 16 sampled captions per photo, val scores as above, and the release: its best.pt beat the
# cross-entropy model at every beam size (docs/model_card.md). Run `make flickr8k-model` first.
# F8K_SCST_SAMPLES: captions sampled per photo (5 trains faster and scored about 3 CIDEr lower on val).
F8K_SCST_RUN ?= flickr8k_scst
F8K_SCST_SAMPLES ?= 16
F8K_SCST := $(F8K_MODEL) --scst --scst-samples $(F8K_SCST_SAMPLES) --init-from model_files/$(F8K_RUN)/last.pt \
            --decoder-lr 2e-4 --lr-schedule cosine --epochs 4 --max-decode-len 20
.PHONY: flickr8k-scst
flickr8k-scst: $(STAMP)
	$(BIN)/python train.py --data $(F8K_DATA) --run $(F8K_SCST_RUN) $(F8K_SCST)
	$(BIN)/python evaluate.py --checkpoint model_files/$(F8K_SCST_RUN)/best.pt --data $(F8K_DATA) --split val \
		--beam-sizes 1 3 5 --length-penalty 0.5
	$(BIN)/python release.py --checkpoint model_files/$(F8K_SCST_RUN)/best.pt \
		--scores model_files/$(F8K_SCST_RUN)/results_val.json --out model_files/flickr8k_efficientnet_lite0.pt

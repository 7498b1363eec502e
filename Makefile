# coffre — see README.md. Every target installs what is missing first.
SHELL := /bin/bash
CARGO ?= cargo
FUZZ_SECONDS ?= 60

.PHONY: all deps build install test crash-test lint fmt demo demo-cloud azurite bench fuzz clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --release --workspace --all-targets

# The binary without its debug info (~26 MB) in $(PREFIX)/bin, the line
# tables beside the system's others for backtraces (scripts/install-binary.sh).
PREFIX ?= /usr/local
install: build
	@scripts/install-binary.sh "$${CARGO_TARGET_DIR:-target}/release/coffre" "$(PREFIX)" "$(DESTDIR)"

# Tests, the demo and the benches share the release profile, so the bundled
# RocksDB is compiled once per target directory.
# A test that cannot run here (no root, a component missing) leaves a
# marker in COFFRE_SKIP_DIR (vault-store/src/skip.rs); the skipped tests
# are listed last. `.ci/run` fails on any that COFFRE_ALLOW_SKIP does not name.
test: deps
	@skips=$${COFFRE_SKIP_DIR:-$$(mktemp -d)}; mkdir -p "$$skips"; \
	  COFFRE_SKIP_DIR="$$skips" $(CARGO) test --release --workspace --all-targets; status=$$?; \
	  scripts/skips.sh "$$skips"; [ -n "$${COFFRE_SKIP_DIR:-}" ] || rm -rf "$$skips"; exit $$status

# SIGKILLs at random moments of every command that writes (backup, prune,
# gc, replicate, rebuild-index, verify --repair, add-replica, snapshot
# expiry, restore --in-place; attach and the shared GC against Azurite)
# until CRASH_KILLS (and CRASH_SHARED_KILLS) landed mid-operation, from a
# fresh seed (printed; COFFRE_CRASH_SEED=N replays); then the power-loss
# test at every operation of each command (COFFRE_POWER_EVERY=1).
# `make test` runs 12 + 2 runs from seed 1.
CRASH_KILLS ?= 300
CRASH_SHARED_KILLS ?= 40
crash-test: deps
	COFFRE_CRASH_KILLS=$(CRASH_KILLS) COFFRE_CRASH_RUNS=3000 COFFRE_CRASH_JOBS=2 \
	  COFFRE_CRASH_SHARED_KILLS=$(CRASH_SHARED_KILLS) COFFRE_CRASH_SHARED_RUNS=400 \
	  COFFRE_CRASH_SEED=$${COFFRE_CRASH_SEED:-$$(date +%s)} \
	  $(CARGO) test --release --workspace --all-targets -- crash_kill --nocapture
	COFFRE_POWER_EVERY=1 $(CARGO) test --release --workspace --all-targets -- power_loss --nocapture

# The fuzz crate builds vault-store without RocksDB (no `index` feature):
# check that build too, so a codec the fuzz targets need never breaks it.
lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	$(CARGO) check --release -p coffre-vault-store --no-default-features

fmt:
	$(CARGO) fmt --all

demo: build
	@scripts/demo.sh

# A vault in Azurite shared by two "hosts": two days each, a restore from a
# fresh cache directory. Starts and stops its own Azurite.
demo-cloud: build azurite
	@scripts/demo-cloud.sh

azurite:
	@scripts/install-deps.sh --azurite

bench: deps
	$(CARGO) bench --workspace --benches

fuzz: deps
	@FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh

clean:
	$(CARGO) clean

# Every cargo call above selects the whole workspace with its dev
# dependencies (--all-targets, or --benches): cargo unifies features
# differently otherwise, which rebuilds bindgen and with it RocksDB.

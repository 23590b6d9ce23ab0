# Holdfast. `make demo` and `make test` are the two commands a new user needs.
SHELL := /bin/bash
CARGO ?= cargo


.PHONY: sigkill-soak
.PHONY: all build demo test unit e2e e2e-bins kafka bench lint fmt clean crds openapi chart image fuzz power-loss

all: build

## build: compile every binary (debug)
build:
	$(CARGO) build --bins

## demo: local Kafka + a capture pod, send events, show them in Kafka, keep serving until Ctrl-C
demo:
	bash scripts/demo.sh

## demo-cluster: Holdfast on the local Kubernetes control plane (chart installed with helm, a CaptureCluster of 3): a pod killed and scaled away, Kafka stopped, every acknowledged event counted in Kafka; stays up until Ctrl-C
.PHONY: demo-cluster
demo-cluster: build kafka e2e-bins
	bash e2e/kubectl.sh >/dev/null || echo "demo-cluster: no pinned kubectl; any kubectl works with the kubeconfig it prints" >&2
	$(CARGO) run -q -p holdfast-e2e --bin holdfast-demo-cluster

## kafka: fetch Apache Kafka's jars from Maven Central into the cache (once)
kafka:
	bash e2e/kafka/fetch.sh

## e2e-bins: build kube-apiserver, controller-manager, scheduler, etcd, helm, promtool from pinned Go modules (once)
e2e-bins:
	bash e2e/bins.sh
	bash e2e/promtool.sh

## test: every test, unit and end-to-end (real Kafka, real Kubernetes control plane)
test: build kafka e2e-bins
	$(CARGO) test --workspace --no-fail-fast -- --test-threads 2
	bash scripts/fuzz.sh smoke 5

## unit: tests that need neither Kafka nor Kubernetes
unit:
	$(CARGO) test -p holdfast-capture -p holdfast-operator

## crds: regenerate crds/ from the Rust types (a test fails when it is stale)
crds:
	$(CARGO) run -q -p holdfast-operator -- crd > crds/captureclusters.holdfast.dev.yaml
	cp crds/*.yaml charts/holdfast/files/crds/
	cp operator/rbac/*.yaml charts/holdfast/files/rbac/

## openapi: regenerate docs/openapi.json from the HTTP handlers' types (a test fails when it is stale)
openapi:
	$(CARGO) run -q -p holdfast-capture -- openapi > docs/openapi.json

## chart: lint and render the Helm chart (schema, CRD and RBAC copies, image name)
chart: e2e-bins
	"$$(bash e2e/bins.sh)/helm" lint --strict charts/holdfast
	$(CARGO) test -p holdfast-e2e --test chart_render --test chart_rbac --test chart_rules

## image: build and run-check holdfast/holdfast:<appVersion> with buildah (root; installs buildah and debootstrap)
image:
	bash scripts/image.sh

## e2e: only the end-to-end tests
e2e: build kafka e2e-bins
	$(CARGO) test -p holdfast-e2e --no-fail-fast -- --test-threads 2

## bench: release build, local Kafka and capture pods, every scenario -> target/bench/report.md, report.json, PNG plots (BASELINE=<git rev> runs that build too, alternating; BENCH_SECS, BENCH_DRAIN_EVENTS scale it; BENCH_ROUNDS=3 repeats each run and reports medians)
bench:
	BASELINE="$(BASELINE)" bash scripts/bench.sh

## bench-drain: drain rate of one buffer (BENCH_EVENTS, default 1,000,000) at-least-once vs exactly-once, release build
.PHONY: bench-drain
bench-drain: kafka
	$(CARGO) build --release --bins
	HOLDFAST_BIN_DIR=$(CURDIR)/target/release $(CARGO) test --release -p holdfast-e2e --test bench_drain -- --ignored --nocapture

## eos-chaos: exactly-once under 50 capture SIGKILLs and 10 broker kills, at-least-once beside it
.PHONY: eos-chaos
eos-chaos: build kafka
	HOLDFAST_EOS_KILLS=$${KILLS:-50} $(CARGO) test -p holdfast-e2e --test capture_exactly_once -- exactly_once_under --nocapture

## bench-operator: the operator at fleet scale (50 CaptureClusters, 1,000 claims and PVs): memory, API requests/min, reconcile latency, new orphan to flush Job
.PHONY: bench-operator
bench-operator: build e2e-bins
	HOLDFAST_E2E_AUDIT=1 $(CARGO) test -p holdfast-e2e --test operator_fleet -- --ignored --nocapture

## fuzz: coverage-guided fuzzing of request decoding (FUZZ_SECONDS per target), then minimize capture/fuzz/corpus
FUZZ_SECONDS ?= 150
fuzz:
	bash scripts/fuzz.sh run $(FUZZ_SECONDS)

## sigkill-soak: the SIGKILL test with 100 kills (make test runs 20)
sigkill-soak: build kafka
	HOLDFAST_SIGKILL_KILLS=$(or $(KILLS),100) $(CARGO) test -p holdfast-e2e --test capture_sigkill -- --nocapture

## power-loss: the power-cut test (FUSE, root): POWER_CUTS cuts per durability mode against real Kafka
POWER_CUTS ?= 20
power-loss: build kafka
	HOLDFAST_POWER_CUTS=$(POWER_CUTS) $(CARGO) test -p holdfast-e2e --test power_loss -- --nocapture --test-threads 1

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

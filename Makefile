# keyvault: the commands a developer and CI run. `make help` lists them.
GO      ?= go
BIN     := bin/keyvault
PKGS    := ./...
FUZZTIME ?= 30s
# The version stamped into the binary. VERSION (the file) names the release
# being made: a clean checkout at its tag vRELEASE is that release; any other
# build is RELEASE-dev+COMMIT ("-dirty" with uncommitted changes), and
# RELEASE-dev outside a git checkout.
RELEASE := $(shell cat VERSION)
VERSION ?= $(shell if [ "$$(git describe --tags --exact-match --dirty 2>/dev/null)" = "v$(RELEASE)" ]; then echo "$(RELEASE)"; \
	elif c=$$(git describe --always --dirty 2>/dev/null); then echo "$(RELEASE)-dev+$$c"; else echo "$(RELEASE)-dev"; fi)

.PHONY: help run test bench build version man deps test-deps vet fmt-check fuzz clean

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

run: deps build ## set up a dev SoftHSM token, keys and store in .keyvault-dev, and serve on 127.0.0.1:8080 (admin :9090), or on LISTEN=ADDR ADMIN_LISTEN=ADDR (kept in its keyvault.yaml for later runs)
	./$(BIN) dev$(if $(LISTEN), --listen $(LISTEN))$(if $(ADMIN_LISTEN), --admin-listen $(ADMIN_LISTEN))

test: deps test-deps fmt-check vet build ## the whole suite: unit, SoftHSM integration, end-to-end, fuzz corpora; under -race; a short make bench; the vault suite again on etcd; the Helm chart (its own module)
	cd deploy/helm/charttest && $(GO) vet ./... && $(GO) test -count=1 ./...
	@out=$$($(GO) test -run '^$$' -bench . -benchtime 1x $(PKGS) 2>&1) || { echo "$$out"; exit 1; }; echo "benchmarks: each ran once, so none rots"
	@out=$$(BIN=$(BIN) BENCH_DURATION=1s BENCH_WARMUP=0s BENCH_USERS=200 BENCH_ROUNDS=2 scripts/bench.sh 2>&1) || { echo "$$out"; exit 1; }; echo "make bench: two 1-second rounds of each run work"
	$(GO) test -race -count=1 -timeout 20m $(PKGS)
	KEYVAULT_TEST_STORE=etcd $(GO) test -race -count=1 -timeout 5m ./vault

bench: deps build ## the HTTP / raw-HSM ratios of recover and enroll (scripts/bench.sh), then the in-process benchmarks with allocations
	BIN=$(BIN) scripts/bench.sh
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 3s $(PKGS)

build: ## build bin/keyvault, its version stamped from the VERSION file and git (VERSION=... to set it)
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/keyvault

version: ## print the version make build stamps
	@echo $(VERSION)

man: build ## write the keyvault(1) man page to bin/keyvault.1 (man -l bin/keyvault.1)
	$(BIN) man > bin/keyvault.1

deps: ## install SoftHSM2 when it is missing (apt-get; sudo when not root)
	@deploy/softhsm/install.sh

test-deps: ## install what make test needs beside SoftHSM2 when it is missing: promtool (the alert rules), opencryptoki and NSS with p11-kit (the other PKCS#11 tokens), zsh and fish (the completion scripts)
	@deploy/prometheus/install-promtool.sh
	@deploy/pkcs11/install.sh
	@scripts/install-shells.sh

vet:
	$(GO) vet $(PKGS)

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

fuzz: ## run every fuzz target of the module (found by name) for FUZZTIME (default 30s)
	@for dir in $$($(GO) list -f '{{.Dir}}' $(PKGS)); do \
		for target in $$(grep -ho '^func Fuzz[A-Za-z0-9_]*' $$dir/*_test.go 2>/dev/null | cut -c6-); do \
			echo "fuzz $$target in $$dir"; \
			$(GO) test $$dir -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) || exit 1; \
		done; \
	done

stress: deps ## every stress scenario at full size, then each fuzz target (FUZZTIME, 60s here); knobs in stress/run.sh
	FUZZTIME=$(if $(filter command line environment,$(origin FUZZTIME)),$(FUZZTIME),60s) stress/run.sh

.PHONY: stress

clean:
	rm -rf bin .keyvault-dev

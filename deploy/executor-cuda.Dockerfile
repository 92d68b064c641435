# openlora executor, CUDA: PyPI's torch (its CUDA build) on a CUDA devel base (nvcc: the CUDA kernels
# compile on the first start, when the GPU they target is visible, into OPENLORA_BUILD_DIR on the
# cache volume, so later starts load them). Schedule it on a GPU node: deploy/k8s/cuda.
# docker build -f deploy/executor-cuda.Dockerfile -t openlora-executor-cuda .   (from the repository root)
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY services ./services
COPY cpp ./cpp
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM nvidia/cuda:12.8.1-devel-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv g++ \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir torch==2.13.0
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir /dist/*.whl && rm -rf /dist
WORKDIR /srv
ENV OPENLORA_BUILD_DIR=/cache/kernels OPENLORA_HOST=0.0.0.0 OPENLORA_PORT=50052 \
    OPENLORA_DEVICE=cuda OPENLORA_DISK_CACHE_DIR=/cache/adapters
EXPOSE 50052
ENTRYPOINT ["openlora", "executor"]

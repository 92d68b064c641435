# openlora executor, CPU: the inference engine (CPU torch + the C++ kernels, built at image build time).
# docker build -f deploy/executor.Dockerfile -t openlora-executor .      (from the repository root)
# The CUDA image is deploy/executor-cuda.Dockerfile.
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY services ./services
COPY cpp ./cpp
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
# torch's CPU build first, from PyTorch's own index (PyPI's torch is the CUDA build)
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir /dist/*.whl && rm -rf /dist
# the kernels compile from the sources the wheel installed, once, into the image
WORKDIR /srv
ENV OPENLORA_BUILD_DIR=/opt/openlora/kernels OPENLORA_HOST=0.0.0.0 OPENLORA_PORT=50052 \
    OPENLORA_DEVICE=cpu OPENLORA_DISK_CACHE_DIR=/cache/adapters
RUN python -c "from services.executor import ops; print(ops.ensure_built())"
EXPOSE 50052
ENTRYPOINT ["openlora", "executor"]

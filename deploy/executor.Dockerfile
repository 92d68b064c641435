# openlora executor: the inference engine (torch + the C++ kernel, built at image build time).
# docker build -f deploy/executor.Dockerfile -t openlora-executor .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/openlora
# CPU torch first (a CUDA image would start FROM an nvidia/cuda base and install the CUDA build).
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY services ./services
COPY cpp ./cpp
RUN pip install --no-cache-dir .
ENV OPENLORA_BUILD_DIR=/opt/openlora/build OPENLORA_HOST=0.0.0.0 OPENLORA_PORT=50052
RUN python -c "from services.executor import ops; print(ops.ensure_built())"
EXPOSE 50052
ENTRYPOINT ["openlora", "executor"]

# openlora registry: adapter metadata (SQLite under /data, or --metadata-url postgresql://...) and
# blobs (files under /data, or --blob-url s3://...).
# docker build -f deploy/registry.Dockerfile -t openlora-registry .
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY services ./services
COPY cpp ./cpp
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM python:3.11-slim
COPY --from=wheel /dist /dist
WORKDIR /srv
# the wheel without its dependencies (no torch: this service never imports it), then what it uses
RUN pip install --no-cache-dir --no-deps /dist/*.whl && rm -rf /dist && pip install --no-cache-dir grpcio grpcio-health-checking \
    grpcio-reflection "protobuf>=7.35.1,<8" safetensors huggingface_hub structlog prometheus_client \
    "psycopg[binary,pool]>=3.1" "boto3>=1.28"
ENV OPENLORA_HOST=0.0.0.0 OPENLORA_PORT=50051 OPENLORA_DATA_DIR=/data
VOLUME /data
EXPOSE 50051
ENTRYPOINT ["openlora", "registry"]

# openlora registry: adapter metadata (SQLite under /data, or --metadata-url postgresql://...) and
# blobs (files under /data, or --blob-url s3://...).
# docker build -f deploy/registry.Dockerfile -t openlora-registry .
FROM python:3.11-slim
WORKDIR /opt/openlora
COPY pyproject.toml README.md ./
COPY services ./services
# the registry never imports torch: install its dependencies only
RUN pip install --no-cache-dir --no-deps . && pip install --no-cache-dir grpcio grpcio-health-checking \
    grpcio-reflection "protobuf>=7.35.1,<8" safetensors huggingface_hub structlog prometheus_client \
    "psycopg[binary,pool]>=3.1" "boto3>=1.28"
ENV OPENLORA_HOST=0.0.0.0 OPENLORA_PORT=50051 OPENLORA_DATA_DIR=/data
VOLUME /data
EXPOSE 50051
ENTRYPOINT ["openlora", "registry"]

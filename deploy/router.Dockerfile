# openlora router: the one endpoint clients use.
# docker build -f deploy/router.Dockerfile -t openlora-router .
FROM python:3.11-slim
WORKDIR /opt/openlora
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install --no-cache-dir --no-deps . && pip install --no-cache-dir grpcio grpcio-health-checking \
    grpcio-reflection "protobuf>=7.35.1,<8" structlog
ENV OPENLORA_HOST=0.0.0.0 OPENLORA_PORT=50050
EXPOSE 50050
ENTRYPOINT ["openlora", "router"]

# openlora gateway: the OpenAI-compatible HTTP front door (talks gRPC to the router and registry).
# docker build -f deploy/gateway.Dockerfile -t openlora-gateway .
# Mount the base model's directory (tokenizer.json, tokenizer_config.json) and set OPENLORA_BASE_MODEL
# to it for chat templates and logprob token strings.
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
    grpcio-reflection "protobuf>=7.35.1,<8" structlog prometheus_client "starlette>=0.37" \
    "uvicorn>=0.30" httptools "jinja2>=3.1" "tokenizers>=0.19"
ENV OPENLORA_HOST=0.0.0.0 OPENLORA_PORT=8000
EXPOSE 8000
ENTRYPOINT ["openlora", "gateway"]

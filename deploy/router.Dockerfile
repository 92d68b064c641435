# openlora router: the one endpoint clients use.
# docker build -f deploy/router.Dockerfile -t openlora-router .
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
    grpcio-reflection "protobuf>=7.35.1,<8" structlog
ENV OPENLORA_HOST=0.0.0.0 OPENLORA_PORT=50050
EXPOSE 50050
ENTRYPOINT ["openlora", "router"]

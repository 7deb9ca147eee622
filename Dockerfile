# meterline: one image for every role (`up`, `core`, `ingest`, `token`).
#   docker build -t meterline .
#   docker run -p 8000:8000 -v meterline-data:/data meterline
# It prints no token; once it has started, create one with:
#   docker run --rm -v meterline-data:/data meterline meterline token create --data-dir /data --org acme
# The Kafka deployment (core, two ingest edges, a load balancer) is deploy/docker-compose.yml.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# README.md is the package's readme in pyproject.toml, so the build needs it.
COPY pyproject.toml README.md ./
COPY ingest ./ingest
COPY aggregator ./aggregator
COPY meters ./meters
RUN /opt/venv/bin/pip install .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# /data is created owned by the service user, so a new named volume mounted there starts
# out writable by it (Docker copies the mount point's ownership into an empty volume).
RUN groupadd --system --gid 10001 meterline \
    && useradd --system --uid 10001 --gid meterline --no-create-home --home-dir /data \
        --shell /usr/sbin/nologin meterline \
    && mkdir /data \
    && chown meterline:meterline /data
COPY --from=build /opt/venv /opt/venv
# Numeric, so a runtime can tell it is not root without the image's passwd file.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
# No curl in the slim image: ask /healthz with the standard library. An ingest edge listens on
# 8001 instead; deploy/docker-compose.yml overrides this check for the edges.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
# SIGTERM (docker stop) lets in-flight requests finish and drains pending writes.
STOPSIGNAL SIGTERM
CMD ["meterline", "up", "--host", "0.0.0.0", "--data-dir", "/data", "--no-dev-token"]

# syntax=docker/dockerfile:1
# Moxy's image. Build and run (docs/deploy.md has the whole story):
#   docker build -t moxy .
#   docker run --rm -p 8080:8080 --stop-timeout 40 \
#     -v moxy-cache:/var/cache/moxy --mount type=bind,src=$PWD/var/moxy.key,dst=/run/secrets/moxy_key,readonly \
#     -e MOXY_BASE_URL=https://images.example.com moxy
#   docker run --rm moxy sign https://example.com/picture.png      (any `moxy` command: the entrypoint is `moxy`)
# Every step below is also run outside Docker by `make image-check` (tests/integration/test_image.py): the locked
# dependencies install by hash into a fresh venv, the wheel built from this tree installs beside them with no
# index, and `moxy serve` answers `moxy health` with this file's environment.

# A pinned Python patch release on a pinned Debian release. To pin the digest too, append the
# `@sha256:…` that `docker buildx imagetools inspect python:3.11.14-slim-bookworm` prints.
ARG BASE=python:3.11.14-slim-bookworm

# -- the dependencies, from the lock alone: a change to Moxy's code never rebuilds this stage
FROM ${BASE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/moxy
COPY deploy/requirements.txt /tmp/requirements.txt
# Hashes required: a dependency that differs by one byte from what was locked is refused.
RUN /opt/moxy/bin/pip install --require-hashes --no-deps --only-binary=:all: -r /tmp/requirements.txt \
    && /opt/moxy/bin/pip check

# -- Moxy itself, as a wheel
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY moxy ./moxy
RUN pip wheel --no-deps --wheel-dir /dist .

# -- the image
FROM ${BASE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="moxy" \
      org.opencontainers.image.description="An HMAC-signed caching URL proxy that never lets a bad upstream answer replace a good copy." \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"

RUN useradd --system --no-create-home --uid 10001 --shell /usr/sbin/nologin moxy \
    && mkdir -p /var/cache/moxy && chown moxy /var/cache/moxy
# The dependency layer: identical between builds until deploy/requirements.txt changes.
COPY --from=deps /opt/moxy /opt/moxy
# The wheel is mounted for this one step, never copied: no layer keeps it.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    PIP_DISABLE_PIP_VERSION_CHECK=1 /opt/moxy/bin/pip install --no-cache-dir --no-deps --no-index /dist/*.whl

ENV PATH=/opt/moxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MOXY_HOST=0.0.0.0 \
    MOXY_PORT=8080 \
    MOXY_CACHE_DIR=/var/cache/moxy \
    MOXY_KEY_FILE=/run/secrets/moxy_key
# The key is never in the image: MOXY_KEY_FILE names where a secret is mounted (docker/compose secrets put
# them in /run/secrets; Kubernetes mounts its Secret there in deploy/kubernetes/moxy.yaml).
USER 10001
VOLUME /var/cache/moxy
EXPOSE 8080
# `moxy health` reads MOXY_PORT like `moxy serve` does, so the check follows a changed port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 CMD ["moxy", "health"]
# On SIGTERM Moxy stops accepting, finishes what is in flight (up to 30 s, and 5 s more before a busy worker is
# killed), then exits 0; SIGHUP is a rolling restart (docs/restarts.md). Give it more than that before the
# engine's SIGKILL: `docker run --stop-timeout 40`, compose `stop_grace_period: 40s`, Kubernetes
# `terminationGracePeriodSeconds: 45` (its 5 s preStop pause comes first).
STOPSIGNAL SIGTERM
ENTRYPOINT ["moxy"]
CMD ["serve"]

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY moxy ./moxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[redis]'

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 moxy && mkdir -p /var/cache/moxy && chown moxy /var/cache/moxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER moxy
ENV MOXY_HOST=0.0.0.0 MOXY_CACHE_DIR=/var/cache/moxy
VOLUME /var/cache/moxy
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)" || exit 1
ENTRYPOINT ["moxy", "serve"]

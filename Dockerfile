# tollway's image: the locked dependencies (pip checks every hash), the project on top, run as an
# unprivileged user. Nothing secret is baked in: settings come at run time from TOLLWAY_* variables,
# TOLLWAY_*_FILE secrets and a mounted tollway.toml (see docker-compose.yml).
#   docker build -t tollway .
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/tollway
COPY requirements.lock /tmp/requirements.lock
RUN /opt/tollway/bin/pip install --require-hashes --only-binary :all: -r /tmp/requirements.lock
COPY pyproject.toml README.md LICENSE /tmp/tollway/
COPY src /tmp/tollway/src
RUN /opt/tollway/bin/pip install --no-deps /tmp/tollway

FROM python:3.11-slim-bookworm
ENV PATH=/opt/tollway/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 tollway \
 && useradd --system --uid 10001 --gid tollway --home-dir /app --no-create-home --shell /usr/sbin/nologin tollway \
 && mkdir -p /app/var && chown -R tollway:tollway /app
COPY --from=build /opt/tollway /opt/tollway
WORKDIR /app
USER 10001:10001
EXPOSE 8402
# python, not curl (the slim image has none): 200 from /healthz, else unhealthy (503: the chain is unreachable)
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TOLLWAY_PORT', '8402'), timeout=4)"]
CMD ["tollway", "serve", "--host", "0.0.0.0"]

# One image for the services of docker-compose.yml: code-location (the default command),
# webserver, daemon and search (`embedding-pipeline serve`). See docs/deployment.md.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home

WORKDIR /tmp/src

# Dependencies first, from pyproject.toml with a placeholder package, so that a code change
# rebuilds only the layers below. Extras: production (dagster-postgres, for the instance in
# deploy/dagster.yaml) and openai (the OpenAI provider); the README lists them all.
COPY pyproject.toml ./
RUN mkdir embedding_pipeline \
    && touch embedding_pipeline/__init__.py README.md \
    && pip install ".[production,openai]" \
    && rm -rf embedding_pipeline README.md build ./*.egg-info

COPY README.md ./
COPY embedding_pipeline ./embedding_pipeline
RUN pip install --no-deps --force-reinstall .

WORKDIR /opt/dagster
RUN rm -rf /tmp/src \
    && useradd --system --uid 10001 --user-group --home-dir /opt/dagster \
        --shell /usr/sbin/nologin dagster \
    && mkdir -p "$DAGSTER_HOME/storage" \
    && chown -R dagster:dagster /opt/dagster
# owned by the runtime user: the embedding-pipeline CLI touches $DAGSTER_HOME/dagster.yaml
COPY --chown=dagster:dagster deploy/dagster.yaml $DAGSTER_HOME/dagster.yaml
COPY deploy/workspace.yaml /opt/dagster/workspace.yaml

# numeric, so that runtimes that insist on a non-root uid (Kubernetes runAsNonRoot) can tell
USER 10001:10001

# The default local model runs from the installed wheels: prove it, and that the
# definitions load, with the network switched off.
RUN --network=none python -c "\
import embedding_pipeline.definitions; \
from embedding_pipeline.lib.embedders import LocalEmbedder; \
v = LocalEmbedder().embed(['offline check']); \
assert v.shape == (1, 384), v.shape; \
print('local model OK, definitions load')"

EXPOSE 3000 4000 8000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", \
     "-m", "embedding_pipeline.definitions"]

# PostgreSQL from Debian's packages, for where the official postgres image cannot be pulled: it takes the same
# settings (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB), keeps its data in the same folder and answers the same
# health check, so compose.yaml runs it in place of postgres:17 (POSTGRES_IMAGE in docker/.env).
#   docker build -f docker/postgres.Dockerfile -t cnn-pipeline-postgres .     (from the repository root)
# BASE: a Debian 12 (bookworm) image, whose PostgreSQL is 15; the tests pass one made by debootstrap.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

ARG PG_MAJOR=15
ENV PGDATA=/var/lib/postgresql/data \
    PATH=/usr/lib/postgresql/${PG_MAJOR}/bin:$PATH

# Only the server's binaries: Debian's packages would also make a cluster of their own, which this image does not
# use (the first start makes one in PGDATA). Debian's security updates are wanted: no version pins. The user
# `postgres` is made first, with the uid and gid of the official image (999), so that the packages keep it.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql --shell /bin/sh postgres \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-common \
    && sed -i 's/^#* *create_main_cluster.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf \
    && apt-get install -y --no-install-recommends "postgresql-${PG_MAJOR}" \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p "$PGDATA" /var/run/postgresql \
    && chown postgres:postgres "$PGDATA" /var/run/postgresql \
    && chmod 700 "$PGDATA"

COPY docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
USER 999:999
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]

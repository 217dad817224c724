# outboxd container image: build with cargo, run on debian-slim as a non-root user.
#   docker build -t outboxd .
#   docker run --read-only -v $PWD/outboxd.toml:/etc/outboxd/outboxd.toml:ro -p 9464:9464 outboxd
# The image holds no configuration: mount one at /etc/outboxd/outboxd.toml (without it
# outboxd exits 78 naming the missing file). scripts/check-image.sh builds and checks it.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The crate registry and the target directory are cache mounts: a rebuild compiles only
# what changed. The binary is copied out of the cache into the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && strip target/release/outboxd \
 && cp target/release/outboxd /outboxd

FROM debian:bookworm-slim
# The binary links libc, libgcc_s, libssl3/libcrypto and zlib, nothing else
# (scripts/check-ops.sh checks this with ldd). tini runs as PID 1: it reaps the orphans a
# command handler's children leave (a process reparented to PID 1 is otherwise never
# waited for) and passes signals on to outboxd.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin outboxd \
 && mkdir -p /etc/outboxd /var/lib/outboxd \
 && chown 10001:10001 /var/lib/outboxd
COPY --from=build /outboxd /usr/local/bin/outboxd
USER 10001:10001
# Listen on all interfaces inside the container so /metrics can be scraped.
ENV OUTBOXD_HTTP__LISTEN=0.0.0.0:9464
EXPOSE 9464
# Writable state (a SQLite database) goes here; with a read-only root, mount a volume.
VOLUME ["/var/lib/outboxd"]
HEALTHCHECK --interval=15s --timeout=6s --start-period=20s --retries=3 \
  CMD ["/usr/local/bin/outboxd", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/outboxd"]
CMD ["run"]

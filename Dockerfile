# syntax=docker/dockerfile:1
# keygate container image: the standalone quickstart node (gateway :8080, admin API :9090,
# SQLite store in /var/lib/keygate).
#
#   docker build -t keygate .
#   docker run -d --name keygate -p 8080:8080 -p 9090:9090 \
#     -e KEYGATE_ADMIN_TOKEN=kgadm_... -v keygate-data:/var/lib/keygate keygate
#
# The built-in config is config/keygate.yaml listening on all interfaces; its demo upstream
# (127.0.0.1:9000) does not exist in the container. Mount your own config over it
# (-v ./my.yaml:/etc/keygate/keygate.yaml:ro) or elsewhere and pass `serve -c PATH`.
# Draining and the final usage flush take up to 35 s after SIGTERM, longer than Docker's
# default 10 s: stop with `docker stop -t 45` (Compose: stop_grace_period: 45s).

FROM rust:1-bookworm AS builder
# cmake builds Pingora's zlib-ng.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The same build as scripts/quickstart.sh (release profile: fat LTO, one codegen unit).
# The registry and target/ are BuildKit caches that are not part of the image, so the
# binary is copied out of target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin keygate \
 && install -D -m 0755 target/release/keygate /out/keygate
# The container's default config: the quickstart's, with the gateway and the admin API
# bound to 0.0.0.0 (127.0.0.1 in a container cannot be reached through -p). The greps
# fail the build if config/keygate.yaml stops matching.
RUN sed -e 's/127\.0\.0\.1:8080/0.0.0.0:8080/' -e 's/127\.0\.0\.1:9090/0.0.0.0:9090/' \
      config/keygate.yaml > /out/keygate.yaml \
 && grep -q '0\.0\.0\.0:8080' /out/keygate.yaml \
 && grep -q '0\.0\.0\.0:9090' /out/keygate.yaml

FROM debian:bookworm-slim
# ca-certificates: TLS to upstreams and to a control plane. A fixed uid/gid, so that
# volumes and Kubernetes' runAsNonRoot/fsGroup can rely on it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 keygate \
 && useradd --system --uid 10001 --gid keygate --no-create-home \
      --home-dir /var/lib/keygate --shell /usr/sbin/nologin keygate \
 && install -d -m 0755 /etc/keygate \
 && install -d -o keygate -g keygate -m 0750 /var/lib/keygate
COPY --from=builder /out/keygate /usr/local/bin/keygate
COPY --from=builder /out/keygate.yaml /etc/keygate/keygate.yaml
# Keys, audit log and usage (the config's relative data/... paths): the working
# directory is the data volume, the only place the process writes.
# Transparent huge pages for the allocator's arenas: a large key index builds 2-3x faster.
ENV MIMALLOC_ALLOW_LARGE_OS_PAGES=1
VOLUME /var/lib/keygate
WORKDIR /var/lib/keygate
USER 10001:10001
EXPOSE 8080 9090
# SIGTERM drains in-flight requests, flushes usage and exits 0.
STOPSIGNAL SIGTERM
# No curl or wget in the image: bash's /dev/tcp asks the admin API's /healthz and
# checks the status line.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && IFS= read -r -t 2 status <&3 && [[ $status == 'HTTP/1.'?' 200'* ]]"]
ENTRYPOINT ["/usr/local/bin/keygate"]
CMD ["serve", "-c", "/etc/keygate/keygate.yaml"]

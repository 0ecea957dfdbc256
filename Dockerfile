# syntax=docker/dockerfile:1

# Build stage: the release binary. The cache mounts keep the crate registry and the target
# directory between builds, so a source change rebuilds only fairway itself.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && cp target/release/fairway /usr/local/bin/fairway

# Runtime stage: the binary, the container config and CA certificates, run as the non-root
# user fairway, UID and GID 10001 (numeric in USER, so that runAsNonRoot can verify it).
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 fairway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin fairway
COPY --from=builder /usr/local/bin/fairway /usr/local/bin/fairway
# Listeners on 0.0.0.0 and the sample nodes of deploy/docker/compose.yaml as servers: mount a
# directory with your own fairway.toml at /etc/fairway (config/fairway.toml is for bare metal).
COPY deploy/docker/fairway.toml /etc/fairway/fairway.toml
ENV FAIRWAY_CONFIG=/etc/fairway/fairway.toml
USER 10001:10001
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/fairway"]
CMD ["run"]

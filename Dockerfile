# Multi-stage build: compile with the Rust toolchain, run on a slim image as a non-root user.
#   docker build -t coexist .
#   docker run -p 25:2525 -v coexist-data:/var/lib/coexist -v ./my.toml:/etc/coexist/coexist.toml:ro coexist
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
RUN cargo build --release --locked --bin coexist

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10025 --home-dir /var/lib/coexist --shell /usr/sbin/nologin coexist \
    && mkdir -p /var/lib/coexist /etc/coexist \
    && chown coexist:coexist /var/lib/coexist
COPY --from=build /src/target/release/coexist /usr/local/bin/coexist
COPY config/coexist.toml /etc/coexist/coexist.toml
USER coexist
WORKDIR /var/lib/coexist
VOLUME ["/var/lib/coexist"]
# SMTP (map host port 25 to it) and the admin API (keep it off the public network).
EXPOSE 2525 8025
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/coexist"]
CMD ["serve", "--config", "/etc/coexist/coexist.toml", "--log-format", "json"]

# The four services in one image: compile in the Rust builder stage, ship only the binaries on a
# slim Debian runtime, run as an unprivileged user. docker-compose.yml picks the binary per service
# with `command:`; for instance `docker run --rm IMAGE kv-service --help`.
# On a machine without a registry, docker/build-images.sh makes an equivalent image from binaries
# built on the host (see docs/DEPLOYMENT.md).

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
        -p distributor -p gateway -p kv-service -p notice-service \
    && mkdir /out \
    && cp target/release/distributor target/release/gateway \
        target/release/kv-service target/release/notice-service /out/

FROM debian:bookworm-slim
RUN useradd --system --create-home --home-dir /home/app --uid 10001 --shell /usr/sbin/nologin app
COPY --from=builder /out/ /usr/local/bin/
USER app
# SQLite files (the binaries' default stores) land here when no other store is given.
WORKDIR /home/app
EXPOSE 8000 8395 9000 9010 9020
CMD ["gateway"]

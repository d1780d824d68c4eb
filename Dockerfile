# syntax=docker/dockerfile:1
# Build: docker build --build-arg GIT_COMMIT=$(git rev-parse --short HEAD) -t disklet .
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends pkg-config libudev-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin disklet

FROM debian:bookworm-slim
# The tools disklet drives: wipefs/blkid (util-linux), mkfs.ext4, mkfs.xfs.
RUN apt-get update && apt-get install -y --no-install-recommends \
      util-linux e2fsprogs xfsprogs libudev1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/disklet /usr/local/bin/disklet
# disklet needs root on the node (mount(2), mkfs, O_EXCL on block devices);
# the DaemonSet grants it, the image does not pretend otherwise.
ENTRYPOINT ["/usr/local/bin/disklet"]

# syntax=docker/dockerfile:1
# Build: docker build --build-arg DISKLET_GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t disklet .
FROM rust:1-bookworm AS build
# Versions of Debian packages are not pinned (hadolint DL3008): the image tag
# fixes the Debian release, whose archive keeps only the current version of
# each package, so a pinned version breaks the build at the next point or
# security release instead of picking up its fixes.
# libblkid-dev and libclang-dev: bindgen makes the libblkid bindings from blkid.h.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends pkg-config libudev-dev \
      libblkid-dev libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY proto ./proto
COPY benches ./benches
# A workspace member (the tests' fake API server): cargo loads every member's
# manifest, even to build one binary.
COPY tests/support/fakeapi ./tests/support/fakeapi
# build.rs bakes it into `disklet --version` (the context has no .git).
ARG DISKLET_GIT_COMMIT=""
RUN cargo build --release --locked --bin disklet

FROM debian:bookworm-slim
# The tools disklet drives: wipefs (util-linux), mkfs.ext4, mkfs.xfs; libblkid1
# (util-linux depends on it) for the in-process probe.
# Unpinned for the reason given in the build stage (DL3008).
# (.ci/run installs exactly the packages on the line after RUN and runs `disklet doctor`.)
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends \
      util-linux libblkid1 mount e2fsprogs xfsprogs libudev1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/disklet /usr/local/bin/disklet
# disklet needs root on the node (mount(2), mkfs, O_EXCL on block devices);
# the DaemonSet grants it, the image does not pretend otherwise.
ENTRYPOINT ["/usr/local/bin/disklet"]

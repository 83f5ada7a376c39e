# Multi-stage build of the Warbler image.
#
#   docker build -t warbler .
#
# Where no base image can be pulled (air-gapped builders), build the image from a locally
# made Debian base and a binary built on the host instead: scripts/docker-image.sh
# (see deploy/docker/README.md).
ARG RUST_IMAGE=rust:1.88-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bin warbler \
 && objcopy --strip-debug --strip-unneeded target/release/warbler /usr/local/bin/warbler

FROM ${RUNTIME_IMAGE} AS rootfs
COPY --from=build /usr/local/bin/warbler /usr/local/bin/warbler
COPY deploy/docker/runtime-setup.sh /tmp/runtime-setup.sh
RUN sh /tmp/runtime-setup.sh
LABEL warbler.stage=rootfs

# Nothing but the binary, the libraries it links and a user: no shell, no package manager.
FROM scratch
COPY --from=rootfs /rootfs/ /
COPY --from=rootfs /usr/local/bin/warbler /usr/local/bin/warbler
USER 10001:10001
ENV PATH=/usr/local/bin \
    WARBLER_DATA_DIR=/var/lib/warbler \
    WARBLER_CLIENT_ADDR=0.0.0.0:7400 \
    WARBLER_HTTP_ADDR=0.0.0.0:7480 \
    WARBLER_CLUSTER_ADDR=0.0.0.0:7410
EXPOSE 7400 7480 7410 7410/udp
VOLUME /var/lib/warbler
# The image has no curl: the binary probes itself (WARBLER_HTTP_ADDR says where).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s CMD ["/usr/local/bin/warbler", "health"]
ENTRYPOINT ["/usr/local/bin/warbler"]
CMD ["serve"]

# syntax=docker/dockerfile:1
# registry-access-operator: a release build with the locked dependency graph, on a distroless,
# non-root runtime image that holds only the binary (and the C runtime it links against).
ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
COPY tests ./tests
COPY examples ./examples
# The same command hack/test.sh runs to check the release binary.
RUN cargo build --release --locked --bin registry-access-operator \
 && install -m 0555 target/release/registry-access-operator /registry-access-operator

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="registry-access-operator" \
      org.opencontainers.image.description="Keeps a fresh Keycloak client_credentials access token in a Kubernetes Secret" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /registry-access-operator /registry-access-operator
USER 65532:65532
ENTRYPOINT ["/registry-access-operator"]
CMD ["run"]

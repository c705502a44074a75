#!/usr/bin/env bash
# hack/node-images.sh: builds the images the node suite (tests/node/) runs, as docker-archive
# tarballs in the git-ignored cache, for `ctr images import` (no registry, no container engine):
#   pause.tar     the pod sandbox, built from the Kubernetes module's build/pause/linux/pause.c;
#   operator.tar  the release binary, statically linked, with the Dockerfile's user, entrypoint,
#                 command and labels, on an empty base (the Dockerfile uses distroless/cc);
#   workload.tar  examples/workload, a pod's view of the mounted token, statically linked.
# Images are assembled with buildah `FROM scratch`; each is rebuilt only when its binary changed.
# Prints `images=<dir>` and the image names as `pause_image=`, `operator_image=`, `workload_image=`.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=hack/versions.env
source "$root/hack/versions.env"
cache=${RAO_CACHE_DIR:-$root/.cache}
images="$cache/images"
mkdir -p "$images"

log() { printf '[node-images] %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || { log "missing required tool: $1 ($2)"; exit 1; }; }
need buildah "buildah assembles the images (Debian package buildah; hack/prerequisites.sh installs it)"
need gcc "gcc builds the pause program"
need go "go finds the Kubernetes module's pause.c"

pause_image="localhost/registry-access-pause:$KUBERNETES_VERSION"
operator_image="localhost/registry-access-operator:node-test"
workload_image="localhost/registry-access-workload:node-test"

buildah_() {
  buildah --root "$cache/buildah/storage" --runroot "$cache/buildah/run" --storage-driver vfs "$@"
}

# image NAME TARBALL BINARY IN-IMAGE-PATH USER ENTRYPOINT-JSON CMD-JSON [LABEL...]: one static
# binary on scratch (plus the files named in the array `files`, as host-path:image-path), written
# to TARBALL unless TARBALL's stamp names the same contents.
files=()
image() {
  local name=$1 tarball=$2 binary=$3 path=$4 user=$5 entrypoint=$6 cmd=$7
  shift 7
  local sum f
  sum=$( { sha256sum "$binary"; for f in "${files[@]}"; do echo "$f"; sha256sum "${f%%:*}"; done; } | sha256sum | cut -d' ' -f1)
  if [[ -f "$tarball" && "$(cat "$tarball.source" 2>/dev/null)" == "$sum $name" ]]; then
    return 0
  fi
  log "assembling $name"
  local ctr
  ctr=$(buildah_ from scratch)
  buildah_ copy --chmod 0555 "$ctr" "$binary" "$path" >/dev/null
  for f in "${files[@]}"; do
    buildah_ copy --chmod 0444 "$ctr" "${f%%:*}" "${f#*:}" >/dev/null
  done
  local args=(--user "$user" --entrypoint "$entrypoint" --cmd "$cmd")
  local label
  for label in "$@"; do args+=(--label "$label"); done
  buildah_ config "${args[@]}" "$ctr"
  rm -f "$tarball"
  buildah_ commit --quiet --rm "$ctr" "docker-archive:$tarball:$name" >/dev/null
  echo "$sum $name" >"$tarball.source"
}

# The pod sandbox, compiled as the Kubernetes release's Makefile does.
pause_binary() {
  local out="$cache/build/pause-$KUBERNETES_VERSION"
  [[ -x "$out" ]] && { echo "$out"; return 0; }
  local dir
  dir=$(cd "$cache/build/kubernetes-$KUBERNETES_VERSION" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
    | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  gcc -Os -Wall -Werror -static -DVERSION="$KUBERNETES_VERSION-rao" -o "$out.tmp" "$dir/build/pause/linux/pause.c" >&2
  mv "$out.tmp" "$out"
  echo "$out"
}

start=$SECONDS
# The release profile of the Dockerfile, linked statically (glibc's static build) so that the
# binaries need nothing from the image; its own target directory in the cache keeps later builds
# incremental.
target="$cache/target-static"
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$target" \
  cargo build --release --locked --quiet --target x86_64-unknown-linux-gnu \
  --manifest-path "$root/Cargo.toml" --bin registry-access-operator --example workload >&2
log "static release build: $((SECONDS - start))s"
bin="$target/x86_64-unknown-linux-gnu/release"

image "$pause_image" "$images/pause.tar" "$(pause_binary)" /pause 65535:65535 '["/pause"]' '[]'
# User, entrypoint, command and labels as in the Dockerfile's runtime stage, and, like its
# distroless base, Debian's root certificates (the operator trusts the system's store).
certs=/etc/ssl/certs/ca-certificates.crt
[[ -f $certs ]] || { log "missing $certs (Debian package ca-certificates)"; exit 1; }
files=("$certs:$certs")
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
image "$operator_image" "$images/operator.tar" "$bin/registry-access-operator" /registry-access-operator \
  65532:65532 '["/registry-access-operator"]' '["run"]' \
  "org.opencontainers.image.title=registry-access-operator" \
  "org.opencontainers.image.description=Keeps a fresh Keycloak client_credentials access token in a Kubernetes Secret" \
  "org.opencontainers.image.version=$version" \
  "org.opencontainers.image.licenses=Apache-2.0"
files=()
image "$workload_image" "$images/workload.tar" "$bin/examples/workload" /workload 65532:65532 '["/workload"]' '[]' \
  "org.opencontainers.image.title=registry-access-workload"
log "images ready: $((SECONDS - start))s"

echo "images=$images"
echo "pause_image=$pause_image"
echo "operator_image=$operator_image"
echo "workload_image=$workload_image"

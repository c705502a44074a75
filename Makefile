# The project's commands. `make demo` and `make test` are the two a newcomer needs.
.PHONY: demo test bench tools crds docs manifests build fmt lint

# A local demo: real kube-apiserver, etcd, kube-controller-manager and Keycloak, the CRD, the
# operator and examples/, showing tokens being refreshed until Ctrl-C; where a node can run (root,
# containerd), in the node suite's sandbox with a kubelet and a pod that mounts the token Secret.
# RAO_DEMO_NODE=0: without the node.
demo: tools
	cargo build --bin registry-access-operator --example demo
	cargo run --example demo

# Every test: formatting, lints, CRD drift, the docs (generated reference and links), unit, token-client,
# end-to-end and node suites.
test:
	bash hack/test.sh

# The benchmark (not part of `make test`): Keycloak's bare grant rate, a bare grant-and-write loop
# and the release operator (first issuance, routine refresh cost, idle writes, restart, memory,
# Keycloak's CPU per grant against the bare loop's) on the end-to-end environment. BENCH_N (default 1000), BENCH_K (10), BENCH_WINDOW (60 s), BENCH_OUT
# (target/bench/bench.json); see examples/bench/main.rs. Prints a table; writes the JSON report. Then
# the pod freshness run (target/bench/pod-freshness.json): delivery delays into mounted volumes
# and the least validity pods saw, with 300 s tokens on the kubelet's default sync period.
bench: tools
	cargo build --release --locked --bin registry-access-operator --example bench
	cargo run --release --locked --example bench
	# Pod freshness on real kubelets (root; about 15 minutes): tests/node/, pod_freshness.
	RAO_POD_FRESHNESS=1 cargo test --locked --test node -- --nocapture

# Build or fetch the end-to-end tools into .cache (seconds once cached).
tools:
	bash hack/prerequisites.sh
	bash hack/provision.sh

# Regenerate the committed CRD from the code.
crds:
	cargo run --quiet -- crd > crds/registryaccesses.registry-access.io.yaml
	cp crds/registryaccesses.registry-access.io.yaml charts/registry-access-operator/crds/

# Regenerate docs/reference.md, the CRD field reference, from the code (a test fails while they differ).
docs:
	cargo run --quiet -- crd-reference > docs/reference.md

# Regenerate deploy/ (the chart rendered with its defaults, for installs without Helm).
manifests:
	bin=$$(bash hack/provision.sh helm | sed -n 's/^bin=//p'); \
	$$bin/helm template registry-access-operator charts/registry-access-operator \
	  --namespace registry-access-operator --kube-version $$(sed -n 's/^KUBERNETES_VERSION=//p' hack/versions.env) \
	  > deploy/registry-access-operator.yaml

build:
	cargo build --release --locked

fmt:
	cargo fmt --all

lint:
	cargo clippy --all-targets --locked -- -D warnings

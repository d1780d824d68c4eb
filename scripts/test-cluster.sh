#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1 for disklet's tests, built from the
# pinned Go modules in tests/cluster/ and cached outside the repo by version.
#
#   scripts/test-cluster.sh build          build (or find cached) the binaries; prints their dir
#   scripts/test-cluster.sh up DIR         start etcd, kube-apiserver, kube-controller-manager,
#                                          kube-scheduler and kwok; writes DIR/admin.kubeconfig
#   scripts/test-cluster.sh down DIR       stop exactly what `up DIR` started, by pid
#   scripts/test-cluster.sh sync-mod       rewrite tests/cluster/*/go.mod from versions.env and
#                                          the Kubernetes release's own go.mod
#
# Environment: DISKLET_CLUSTER_CACHE (default ~/.cache/disklet-cluster) holds the binaries;
# DISKLET_CLUSTER_PORT_BASE (default: a free port found at `up`) picks the ports.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../tests/cluster/versions.env
. "$repo/tests/cluster/versions.env"
cache=${DISKLET_CLUSTER_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/disklet-cluster}
mods="$repo/tests/cluster"

die() { echo "test-cluster: $*" >&2; exit 1; }
log() { echo "test-cluster: $*" >&2; }

# The staging modules k8s.io/kubernetes replaces with ./staging/src/k8s.io/<name>, read
# from the release's own go.mod: each becomes k8s.io/<name> v0.<minor>.<patch>.
staging_replaces() {
  local gomod staging_version
  gomod=$(cd / && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$K8S_VERSION's go.mod"
  staging_version="v0.${K8S_VERSION#v1.}"
  sed -n "s#^\s*\(k8s.io/[a-z0-9-]*\) => \./staging/src/k8s.io/[a-z0-9-]*\$#\t\1 => \1 $staging_version#p" "$gomod"
}

# A sidecar's wrapper module: requires MODULE@VERSION with the release's own replace
# lines (those to local paths left out) and imports PKG... in tools.go.
sidecar_mod() { # DIR MODULE VERSION PKG...
  local dir=$1 module=$2 version=$3 gomod name p
  shift 3
  name=$(basename "$dir")
  gomod=$(cd / && go mod download -json "$module@$version" |
    sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$gomod" ] || die "could not download $module@$version's go.mod"
  mkdir -p "$dir"
  {
    printf 'module disklet.test/cluster/%s\n\ngo 1.26.0\n\nrequire %s %s\n\n' "$name" "$module" "$version"
    printf '// Derived from %s@%s go.mod by scripts/test-cluster.sh sync-mod.\nreplace (\n' "$module" "$version"
    sed -n -e 's#^replace \(.*=> [^.].*\)$#\1#p' -e '/^replace (/,/^)/{/=>/{/=> \./!p}}' "$gomod" |
      sed 's/^\s*/\t/'
    printf ')\n'
  } >"$dir/go.mod"
  {
    printf '//go:build tools\n\n// Package tools pins %s for scripts/test-cluster.sh.\npackage tools\n\nimport (\n' "$name"
    for p in "$@"; do printf '\t_ "%s"\n' "$p"; done
    printf ')\n'
  } >"$dir/tools.go"
  (cd "$dir" && rm -f go.sum && go mod tidy)
}

sync_mod() {
  local replaces
  replaces=$(staging_replaces)
  (
    cd "$mods/kubernetes"
    {
      printf 'module disklet.test/cluster/kubernetes\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes %s\n\n' "$K8S_VERSION"
      printf '// Derived from k8s.io/kubernetes@%s go.mod by scripts/test-cluster.sh sync-mod.\nreplace (\n%s\n)\n' "$K8S_VERSION" "$replaces"
    } >go.mod
    rm -f go.sum
    go mod tidy
  )
  (cd "$mods/etcd" && printf 'module disklet.test/cluster/etcd\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" >go.mod && rm -f go.sum && go mod tidy)
  (cd "$mods/csi-test" && printf 'module disklet.test/cluster/csi-test\n\ngo 1.26.0\n\nrequire github.com/kubernetes-csi/csi-test/v5 %s\n' "$CSI_TEST_VERSION" >go.mod && rm -f go.sum && go mod tidy)
  (cd "$mods/kwok" && printf 'module disklet.test/cluster/kwok\n\ngo 1.26.0\n\nrequire sigs.k8s.io/kwok %s\n' "$KWOK_VERSION" >go.mod && rm -f go.sum && go mod tidy)
  local p=github.com/kubernetes-csi
  sidecar_mod "$mods/csi-provisioner" "$p/external-provisioner/v6" "$CSI_PROVISIONER_VERSION" \
    "$p/external-provisioner/v6/cmd/csi-provisioner"
  sidecar_mod "$mods/csi-snapshotter" "$p/external-snapshotter/v8" "$CSI_SNAPSHOTTER_VERSION" \
    "$p/external-snapshotter/v8/cmd/csi-snapshotter" "$p/external-snapshotter/v8/cmd/snapshot-controller"
  # The release replaces its client module with ./client: the same version from the proxy.
  (cd "$mods/csi-snapshotter" && go get "$p/external-snapshotter/client/v8@$CSI_SNAPSHOTTER_VERSION" && go mod tidy)
  sidecar_mod "$mods/csi-resizer" "$p/external-resizer/v2" "$CSI_RESIZER_VERSION" \
    "$p/external-resizer/v2/cmd/csi-resizer"
}

# The committed replace block must be what the release's go.mod says today.
check_mod() {
  local want have
  want=$(staging_replaces)
  have=$(sed -n '/^replace (/,/^)/p' "$mods/kubernetes/go.mod" | grep '=>' || true)
  [ "$want" = "$have" ] || die "tests/cluster/kubernetes/go.mod's replace lines differ from k8s.io/kubernetes@$K8S_VERSION's staging list: run scripts/test-cluster.sh sync-mod"
  grep -q "k8s.io/kubernetes $K8S_VERSION\$" "$mods/kubernetes/go.mod" || die "tests/cluster/kubernetes/go.mod does not require k8s.io/kubernetes $K8S_VERSION: run scripts/test-cluster.sh sync-mod"
}

# One component's cache dir: keyed by version and by the hash of its go.mod/go.sum.
key_dir() { # NAME VERSION MODDIR
  local sum
  sum=$(cat "$3/go.mod" "$3/go.sum" | sha256sum | cut -c1-12)
  echo "$cache/$1-$2-$sum"
}

build_one() { # NAME VERSION MODDIR LDFLAGS PACKAGE...
  local name=$1 version=$2 dir=$3 ldflags=$4 out tmp start
  shift 4
  out=$(key_dir "$name" "$version" "$dir")
  [ -f "$out/.complete" ] && return 0
  tmp="$out.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp"
  start=$(date +%s)
  log "building $name $version (first time on this machine; cached in $out)"
  (cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w $ldflags" -o "$tmp/" "$@") ||
    die "go build of $name $version failed (module $dir)"
  echo "$(($(date +%s) - start))" >"$tmp/.build-seconds"
  touch "$tmp/.complete"
  rm -rf "$out" && mv "$tmp" "$out"
  log "built $name $version in $(cat "$out/.build-seconds") s"
}

build() {
  command -v go >/dev/null || die "go is not installed (Go 1.26 or newer is needed to build the control plane)"
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9
  local kdir edir wdir minor date ldk
  kdir=$(key_dir kubernetes "$K8S_VERSION" "$mods/kubernetes")
  edir=$(key_dir etcd "$ETCD_VERSION" "$mods/etcd")
  wdir=$(key_dir kwok "$KWOK_VERSION" "$mods/kwok")
  if [ ! -f "$kdir/.complete" ]; then
    check_mod
    minor=${K8S_VERSION#v1.}
    minor=${minor%%.*}
    date=$(cd / && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
      sed -n 's/^\s*"Time": "\(.*\)",$/\1/p')
    ldk=""
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldk="$ldk -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
      ldk="$ldk -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
    done
    build_one kubernetes "$K8S_VERSION" "$mods/kubernetes" "$ldk" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
  fi
  build_one etcd "$ETCD_VERSION" "$mods/etcd" \
    "-X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" go.etcd.io/etcd/server/v3
  [ -f "$edir/server" ] && [ ! -e "$edir/etcd" ] && mv "$edir/server" "$edir/etcd"
  build_one kwok "$KWOK_VERSION" "$mods/kwok" \
    "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
  # kwok's own "fast" stages (node Ready at once, heartbeat with a Lease, pods Running at
  # once, deleted pods gone), from the very module it was built from.
  if [ ! -f "$wdir/kwok-stages.yaml" ]; then
    local kd
    kd=$(cd "$mods/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
    for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
      pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
      echo "---"
      cat "$kd/kustomize/stage/$f"
    done >"$wdir/kwok-stages.yaml.tmp"
    mv "$wdir/kwok-stages.yaml.tmp" "$wdir/kwok-stages.yaml"
  fi
  # csi-sanity, for the CSI driver's conformance test (tests/csi_sanity.rs).
  local cdir
  cdir=$(key_dir csi-test "$CSI_TEST_VERSION" "$mods/csi-test")
  build_one csi-test "$CSI_TEST_VERSION" "$mods/csi-test" "" \
    github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
  # The CSI sidecars and snapshot-controller (tests/csi_e2e.rs), and the VolumeSnapshot
  # CRDs from the very client module the snapshotter was built with.
  local p=github.com/kubernetes-csi pdir sdir rdir
  pdir=$(key_dir csi-provisioner "$CSI_PROVISIONER_VERSION" "$mods/csi-provisioner")
  sdir=$(key_dir csi-snapshotter "$CSI_SNAPSHOTTER_VERSION" "$mods/csi-snapshotter")
  rdir=$(key_dir csi-resizer "$CSI_RESIZER_VERSION" "$mods/csi-resizer")
  build_one csi-provisioner "$CSI_PROVISIONER_VERSION" "$mods/csi-provisioner" "" \
    "$p/external-provisioner/v6/cmd/csi-provisioner"
  build_one csi-snapshotter "$CSI_SNAPSHOTTER_VERSION" "$mods/csi-snapshotter" "" \
    "$p/external-snapshotter/v8/cmd/csi-snapshotter" "$p/external-snapshotter/v8/cmd/snapshot-controller"
  build_one csi-resizer "$CSI_RESIZER_VERSION" "$mods/csi-resizer" "" \
    "$p/external-resizer/v2/cmd/csi-resizer"
  if [ ! -f "$sdir/snapshot-crds.yaml" ]; then
    local cd
    cd=$(cd "$mods/csi-snapshotter" && go list -m -f '{{.Dir}}' "$p/external-snapshotter/client/v8")
    for f in "$cd"/config/crd/snapshot.storage.k8s.io_*.yaml; do
      echo "---"
      cat "$f"
    done >"$sdir/snapshot-crds.yaml.tmp"
    mv "$sdir/snapshot-crds.yaml.tmp" "$sdir/snapshot-crds.yaml"
  fi
  flock -u 9
  # One dir of links, so callers need one PATH entry; named by what it links.
  local bin
  bin="$cache/bin-$(for d in "$kdir" "$edir" "$wdir" "$cdir" "$pdir" "$sdir" "$rdir"; do basename "$d"; done | sha256sum | cut -c1-12)"
  mkdir -p "$bin"
  ln -sf "$cdir/csi-sanity" "$pdir/csi-provisioner" "$sdir/csi-snapshotter" "$sdir/snapshot-controller" \
    "$sdir/snapshot-crds.yaml" "$rdir/csi-resizer" "$bin/"
  ln -sf "$kdir"/kube-apiserver "$kdir"/kube-controller-manager "$kdir"/kube-scheduler "$kdir"/kubectl "$bin/"
  ln -sf "$edir/etcd" "$wdir/kwok" "$wdir/kwok-stages.yaml" "$bin/"
  echo "$bin"
}

# A port nothing listens on (bash's /dev/tcp connects to test it).
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 30000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  die "no free port found on 127.0.0.1"
}

# A CA, the apiserver's serving cert, the admin's client cert (system:masters) and
# the service-account signing key, all under DIR/pki.
make_pki() {
  local pki=$1
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=disklet-test-ca \
      -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout apiserver.key \
      -out apiserver.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=admin" -keyout admin.key \
      -out admin.csr 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile client.ext -out admin.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

kubeconfig() { # FILE SERVER PKI
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: disklet-test
  cluster:
    server: $2
    certificate-authority: $3/ca.crt
users:
- name: admin
  user:
    client-certificate: $3/admin.crt
    client-key: $3/admin.key
contexts:
- name: disklet-test
  context: {cluster: disklet-test, user: admin}
current-context: disklet-test
KC
}

# Starts one component in the background; its pid goes to DIR/pids/NAME, its output
# to DIR/logs/NAME.log.
start() { # DIR NAME BINARY ARGS...
  local dir=$1 name=$2
  shift 2
  nohup "$@" >"$dir/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/pids/$name"
}

# Polls COMMAND until it succeeds; fails at once when a component started so far exited.
wait_for() { # WHAT SECONDS DIR COMMAND...
  local what=$1 secs=$2 dir=$3 f dead
  shift 3
  local end=$(($(date +%s) + secs))
  until "$@" >/dev/null 2>&1; do
    dead=""
    for f in "$dir"/pids/*; do
      kill -0 "$(cat "$f")" 2>/dev/null || dead="$dead $(basename "$f")"
    done
    if [ -n "$dead" ] || [ "$(date +%s)" -ge "$end" ]; then
      [ -n "$dead" ] && log "exited before $what:$dead"
      log "$what did not come up within ${secs}s; logs in $dir/logs:"
      tail -n 20 "$dir"/logs/*.log >&2 || true
      down "$dir"
      exit 1
    fi
    sleep 0.2
  done
}

up() {
  local dir=${1:?usage: up DIR}
  local bin ep pp ap
  [ -e "$dir/pids" ] && [ -n "$(ls -A "$dir/pids" 2>/dev/null)" ] && die "$dir already has a running cluster (down it first)"
  bin=$(build)
  mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
  mkdir -p "$dir/logs" "$dir/pids" "$dir/etcd"
  ep=$(free_port) pp=$(free_port) ap=$(free_port)
  make_pki "$dir/pki"
  local server="https://127.0.0.1:$ap" pki="$dir/pki"
  kubeconfig "$dir/admin.kubeconfig" "$server" "$pki"
  printf 'ETCD_PORT=%s\nAPISERVER_PORT=%s\nBIN=%s\n' "$ep" "$ap" "$bin" >"$dir/cluster.env"
  # The apiserver's audit log records every request of deploy/'s ServiceAccounts
  # (the agents'), with the node its token is bound to: tests count an agent's
  # requests and read what RBAC refused from the apiserver's own record.
  cat >"$dir/audit-policy.yaml" <<'AP'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts:disklet-system"]
  - level: None
AP

  # etcd without fsync: a test cluster, rebuilt from nothing every run.
  start "$dir" etcd "$bin/etcd" --name=disklet-test --data-dir="$dir/etcd" \
    --listen-client-urls="http://127.0.0.1:$ep" --advertise-client-urls="http://127.0.0.1:$ep" \
    --listen-peer-urls="http://127.0.0.1:$pp" --initial-advertise-peer-urls="http://127.0.0.1:$pp" \
    --initial-cluster="disklet-test=http://127.0.0.1:$pp" --unsafe-no-fsync \
    --quota-backend-bytes=4294967296
  start "$dir" kube-apiserver "$bin/kube-apiserver" --etcd-servers="http://127.0.0.1:$ep" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$ap" \
    --endpoint-reconciler-type=none \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --api-audiences=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true --profiling=false \
    --cert-dir="$dir/pki/apiserver-generated" \
    --audit-policy-file="$dir/audit-policy.yaml" --audit-log-path="$dir/logs/audit.log" \
    --audit-log-format=json
  wait_for "kube-apiserver /readyz" 120 "$dir" "$bin/kubectl" --kubeconfig="$dir/admin.kubeconfig" get --raw=/readyz
  start "$dir" kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig="$dir/admin.kubeconfig" --authentication-kubeconfig="$dir/admin.kubeconfig" \
    --authorization-kubeconfig="$dir/admin.kubeconfig" --secure-port=0 --leader-elect=false \
    --controllers='*' --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --cluster-name=disklet-test --profiling=false
  start "$dir" kube-scheduler "$bin/kube-scheduler" --kubeconfig="$dir/admin.kubeconfig" \
    --authentication-kubeconfig="$dir/admin.kubeconfig" \
    --authorization-kubeconfig="$dir/admin.kubeconfig" --secure-port=0 --leader-elect=false \
    --profiling=false
  # kwok keeps the Nodes annotated kwok.x-k8s.io/node=fake Ready (with a Lease) and their
  # pods Running; the stages are kwok's own "fast" ones (copied at build).
  start "$dir" kwok "$bin/kwok" --kubeconfig="$dir/admin.kubeconfig" --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --config="$bin/kwok-stages.yaml" --node-lease-duration-seconds=40 --cidr=10.244.0.1/16 \
    --node-ip=127.0.0.1
  # Ready for tests once the controllers run: the token controller has made the
  # default ServiceAccount, the scheduler and kwok are alive.
  wait_for "the default ServiceAccount (kube-controller-manager)" 120 "$dir" \
    "$bin/kubectl" --kubeconfig="$dir/admin.kubeconfig" -n default get serviceaccount default
  for c in kube-controller-manager kube-scheduler kwok; do
    kill -0 "$(cat "$dir/pids/$c")" 2>/dev/null || {
      log "$c exited at start:"
      tail -n 30 "$dir/logs/$c.log" >&2
      down "$dir"
      exit 1
    }
  done
  log "up: $dir/admin.kubeconfig ($server)"
}

# Stops what `up DIR` started: each pid in DIR/pids, and only while that pid still
# runs a command line naming DIR (a pid the kernel gave to someone else is left alone).
# Pids a test added there (e.g. snapshot-controller) go first, the apiserver's clients
# before it, etcd last.
down() {
  local dir=${1:?usage: down DIR} f pid name extra=""
  [ -d "$dir/pids" ] || return 0
  dir=$(cd "$dir" && pwd)
  for f in "$dir"/pids/*; do
    [ -f "$f" ] || continue
    case "$(basename "$f")" in
      kwok | kube-scheduler | kube-controller-manager | kube-apiserver | etcd) ;;
      *) extra="$extra $(basename "$f")" ;;
    esac
  done
  for name in $extra kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
    f="$dir/pids/$name"
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$dir"; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  log "down: $dir"
}

case "${1:-}" in
  build) build ;;
  up) up "${2:-}" ;;
  down) down "${2:-}" ;;
  sync-mod) sync_mod ;;
  *) die "usage: $0 build | up DIR | down DIR | sync-mod" ;;
esac

#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1 for disklet's tests, built from the
# pinned Go modules in tests/cluster/ and cached outside the repo by version.
#
#   scripts/test-cluster.sh build          build (or find cached) the binaries; prints their dir
#   scripts/test-cluster.sh up DIR         start etcd, kube-apiserver, kube-controller-manager,
#                                          kube-scheduler and kwok; writes DIR/admin.kubeconfig
#   scripts/test-cluster.sh up DIR --kubelet   the same, plus one real node on this machine:
#                                          containerd, runc, CNI bridge and the real kubelet
#   scripts/test-cluster.sh kubelet-restart DIR   kubelet stopped and started (pods keep running)
#   scripts/test-cluster.sh node-reboot DIR   the node's power cut and boot: pods, kubelet,
#                                          containerd gone, their mounts too; then started again
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
  local replaces m
  replaces=$(staging_replaces)
  # Two modules of k8s.io/kubernetes with the same replace lines: the control plane's,
  # and the kubelet's (its own, so that the control plane's cache key does not move).
  for m in kubernetes kubelet; do
    (
      cd "$mods/$m"
      {
        printf 'module disklet.test/cluster/%s\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes %s\n\n' "$m" "$K8S_VERSION"
        printf '// Derived from k8s.io/kubernetes@%s go.mod by scripts/test-cluster.sh sync-mod.\nreplace (\n%s\n)\n' "$K8S_VERSION" "$replaces"
      } >go.mod
      rm -f go.sum
      go mod tidy
    )
  done
  (cd "$mods/registrar" && printf 'module disklet.test/cluster/registrar\n\ngo 1.26.0\n\nrequire k8s.io/kubelet v0.%s\n' "${K8S_VERSION#v1.}" >go.mod && rm -f go.sum && go mod tidy)
  (cd "$mods/containerd" && printf 'module disklet.test/cluster/containerd\n\ngo 1.26.0\n\nrequire github.com/containerd/containerd/v2 %s\n' "$CONTAINERD_VERSION" >go.mod && rm -f go.sum && go mod tidy)
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
  local want have m
  want=$(staging_replaces)
  for m in kubernetes kubelet; do
    have=$(sed -n '/^replace (/,/^)/p' "$mods/$m/go.mod" | grep '=>' || true)
    [ "$want" = "$have" ] || die "tests/cluster/$m/go.mod's replace lines differ from k8s.io/kubernetes@$K8S_VERSION's staging list: run scripts/test-cluster.sh sync-mod"
    grep -q "k8s.io/kubernetes $K8S_VERSION\$" "$mods/$m/go.mod" || die "tests/cluster/$m/go.mod does not require k8s.io/kubernetes $K8S_VERSION: run scripts/test-cluster.sh sync-mod"
  done
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

# The version stamp of a Kubernetes binary, as the release's own build sets it.
k8s_ldflags() {
  local minor date pkg ldk=""
  minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  date=$(cd / && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    sed -n 's/^\s*"Time": "\(.*\)",$/\1/p')
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldk="$ldk -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldk="$ldk -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  echo "$ldk"
}

build() {
  command -v go >/dev/null || die "go is not installed (Go 1.26 or newer is needed to build the control plane)"
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9
  local kdir edir wdir
  kdir=$(key_dir kubernetes "$K8S_VERSION" "$mods/kubernetes")
  edir=$(key_dir etcd "$ETCD_VERSION" "$mods/etcd")
  wdir=$(key_dir kwok "$KWOK_VERSION" "$mods/kwok")
  if [ ! -f "$kdir/.complete" ]; then
    check_mod
    build_one kubernetes "$K8S_VERSION" "$mods/kubernetes" "$(k8s_ldflags)" \
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
  # The kubelet node (up DIR --kubelet): the kubelet, and containerd with ctr and its runc
  # shim (no cgo: without the btrfs, devmapper and zfs snapshotters, which need it).
  local ldir ctdir
  ldir=$(key_dir kubelet "$K8S_VERSION" "$mods/kubelet")
  ctdir=$(key_dir containerd "$CONTAINERD_VERSION" "$mods/containerd")
  [ -f "$ldir/.complete" ] || check_mod
  [ -f "$ldir/.complete" ] ||
    build_one kubelet "$K8S_VERSION" "$mods/kubelet" "$(k8s_ldflags)" k8s.io/kubernetes/cmd/kubelet
  GOFLAGS=-tags=no_btrfs,no_devmapper,no_zfs build_one containerd "$CONTAINERD_VERSION" \
    "$mods/containerd" "-X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
    github.com/containerd/containerd/v2/cmd/containerd \
    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
    github.com/containerd/containerd/v2/cmd/ctr
  # Registers disklet csi with the kubelet node's kubelet in node-driver-registrar's
  # place (tests/cluster/registrar/main.go says why).
  local gdir
  gdir=$(key_dir registrar "$K8S_VERSION" "$mods/registrar")
  build_one registrar "$K8S_VERSION" "$mods/registrar" "" .
  flock -u 9
  # One dir of links, so callers need one PATH entry; named by what it links.
  local bin
  bin="$cache/bin-$(for d in "$kdir" "$edir" "$wdir" "$cdir" "$pdir" "$sdir" "$rdir" "$ldir" "$ctdir" "$gdir"; do basename "$d"; done | sha256sum | cut -c1-12)"
  mkdir -p "$bin"
  ln -sf "$cdir/csi-sanity" "$pdir/csi-provisioner" "$sdir/csi-snapshotter" "$sdir/snapshot-controller" \
    "$sdir/snapshot-crds.yaml" "$rdir/csi-resizer" "$bin/"
  ln -sf "$kdir"/kube-apiserver "$kdir"/kube-controller-manager "$kdir"/kube-scheduler "$kdir"/kubectl "$bin/"
  ln -sf "$edir/etcd" "$wdir/kwok" "$wdir/kwok-stages.yaml" "$bin/"
  ln -sf "$ldir/kubelet" "$ctdir/containerd" "$ctdir/containerd-shim-runc-v2" "$ctdir/ctr" \
    "$gdir/registrar" "$bin/"
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
  local dir=${1:?usage: up DIR [--kubelet]} with_kubelet=${2:-}
  local bin ep pp ap
  case "$with_kubelet" in "" | --kubelet) ;; *) die "up: unknown option $with_kubelet (only --kubelet)" ;; esac
  [ "$with_kubelet" = --kubelet ] && node_check
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
    --audit-log-format=json --kubelet-preferred-address-types=InternalIP,Hostname \
    --kubelet-client-certificate="$pki/admin.crt" --kubelet-client-key="$pki/admin.key"
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
  if [ "$with_kubelet" = --kubelet ]; then
    # A failure past this point (a die, or set -e) takes the whole cluster down with it.
    trap 'down "$dir"' EXIT
    node_up "$dir" "$bin" "$server" "$pki" "$ap"
    trap - EXIT
  fi
  log "up: $dir/admin.kubeconfig ($server)"
}

# ---- The kubelet node (up DIR --kubelet) ----------------------------------------------
# One real node on this machine beside the kwok ones: containerd (root and state under
# DIR/node), Debian's runc, a CNI bridge from Debian's plugins, and the kubelet (root dir
# DIR/node/kubelet, pods in a cgroup of their own). No image registry is reachable, so
# its two images are made here and imported: the sandbox's pause (tests/cluster/pause)
# and busybox from Debian's busybox-static. `down DIR` kills the pods' processes, stops
# kubelet, containerd and the shims, unmounts what they left under DIR, and removes the
# cgroups and the bridge; kubelet's kernel sysctls are put back as they were.
node_name=kubelet-node
PAUSE_IMAGE=registry.k8s.io/pause:3.10.1
BUSYBOX_IMAGE=disklet.test/busybox:1

# An image archive (docker-archive format, which `ctr images import` reads) of one
# layer, ROOTFS, with CONFIG (JSON members of the image config, e.g. "Cmd": [...]).
make_image() { # OUT NAME ROOTFS CONFIG
  local out=$1 name=$2 rootfs=$3 config=$4 t l c
  t=$(mktemp -d)
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$rootfs" -cf "$t/layer.tar" .
  l=$(sha256sum "$t/layer.tar" | cut -d' ' -f1)
  mkdir "$t/$l" && mv "$t/layer.tar" "$t/$l/layer.tar"
  printf '{"architecture":"%s","os":"linux","config":{%s,"Env":["PATH=/bin"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$(go env GOARCH)" "$config" "$l" >"$t/config.json"
  c=$(sha256sum "$t/config.json" | cut -d' ' -f1)
  mv "$t/config.json" "$t/$c.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' "$c" "$name" "$l" >"$t/manifest.json"
  tar -C "$t" -cf "$out.tmp" manifest.json "$c.json" "$l" && mv "$out.tmp" "$out"
  rm -rf "$t"
}

# The node's images, cached by the pause source's and busybox's hashes; prints the dir.
node_images() {
  local dir r
  dir="$cache/images-$(cat "$mods/pause/main.go" /bin/busybox | sha256sum | cut -c1-12)"
  if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir" && mkdir -p "$dir/pause" "$dir/busybox/bin" "$dir/busybox/etc" "$dir/busybox/tmp"
    (cd "$mods/pause" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$dir/pause/pause" .)
    cp /bin/busybox "$dir/busybox/bin/"
    for r in $(/bin/busybox --list); do
      [ "$r" = busybox ] || ln -s busybox "$dir/busybox/bin/$r"
    done
    echo "root:x:0:0:root:/:/bin/sh" >"$dir/busybox/etc/passwd"
    echo "root:x:0:" >"$dir/busybox/etc/group"
    make_image "$dir/pause.tar" "$PAUSE_IMAGE" "$dir/pause" '"Entrypoint":["/pause"]'
    make_image "$dir/busybox.tar" "$BUSYBOX_IMAGE" "$dir/busybox" '"Cmd":["/bin/sh"]'
    touch "$dir/.complete"
  fi
  echo "$dir"
}

# The cgroup v1 controllers mounted here (cgroup2 lives at /sys/fs/cgroup/unified).
v1_controllers() {
  local c
  for c in /sys/fs/cgroup/*; do
    [ "$(basename "$c")" = unified ] && continue
    [ -d "$c" ] && basename "$c"
  done
}

# The node's address: the default route's source (kubelet refuses a loopback node IP).
node_ip() {
  ip -4 route get 192.0.2.255 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p'
}

# What the kubelet node needs from this machine, checked before anything starts.
node_check() {
  local c
  for c in /usr/sbin/runc /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/loopback; do
    [ -x "$c" ] || die "the kubelet node needs $c: apt-get install runc containernetworking-plugins (scripts/setup-debian.sh does)"
  done
  [ -x /bin/busybox ] || die "the kubelet node needs Debian's busybox-static (/bin/busybox): apt-get install busybox-static (scripts/setup-debian.sh does)"
  [ -n "$(node_ip)" ] || die "the kubelet node needs an IPv4 address that is not loopback (kubelet refuses 127.0.0.1): none routes here"
  # Pods are tracked (and killed at down) through the cgroup v1 pids hierarchy.
  [ "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ] && [ -d /sys/fs/cgroup/pids ] ||
    die "the kubelet node is made for cgroup v1 hosts (this machine's layout, with pids at /sys/fs/cgroup/pids); this host has none"
}

node_up() { # DIR BIN SERVER PKI PORT
  local dir=$1 bin=$2 server=$3 pki=$4 port=$5 nd images ip cg c kp
  nd="$dir/node"
  images=$(node_images)
  ip=$(node_ip)
  mkdir -p "$nd/containerd" "$nd/cni/net.d" "$nd/kubelet" "$nd/pki" "$nd/pod-logs"
  cg="/disklet-test-$port"
  kp=$(free_port)
  printf 'NODE_NAME=%s\nNODE_DIR=%s\nNODE_IP=%s\nNODE_IMAGE=%s\nNODE_CGROUP=%s\nNODE_BRIDGE=dkl%s\n' \
    "$node_name" "$nd" "$ip" "$BUSYBOX_IMAGE" "$cg" "$port" >>"$dir/cluster.env"
  mkdir -p "$nd/images"
  cp "$images/pause.tar" "$images/busybox.tar" "$nd/images/"
  # kubelet sets these on start (protectKernelDefaults off), the bridge plugin
  # ip_forward; down puts them back.
  for c in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops \
    kernel/keys/root_maxkeys kernel/keys/root_maxbytes net/ipv4/ip_forward; do
    echo "$c=$(cat "/proc/sys/$c")"
  done >"$nd/sysctl.orig"
  (
    cd "$nd/pki"
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:nodes/CN=system:node:$node_name" \
      -keyout kubelet.key -out kubelet.csr 2>/dev/null
    printf 'extendedKeyUsage=clientAuth,serverAuth\nsubjectAltName=IP:%s,DNS:%s\n' "$ip" "$node_name" >kubelet.ext
    openssl x509 -req -in kubelet.csr -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -days 3650 -extfile kubelet.ext -out kubelet.crt 2>/dev/null
  )
  cat >"$nd/kubelet.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: disklet-test
  cluster: {server: "$server", certificate-authority: $pki/ca.crt}
users:
- name: kubelet
  user: {client-certificate: $nd/pki/kubelet.crt, client-key: $nd/pki/kubelet.key}
contexts:
- name: disklet-test
  context: {cluster: disklet-test, user: kubelet}
current-context: disklet-test
KC
  # restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE, so runc cannot lower a
  # sandbox's oom_score_adj to kubelet's -998 ("failed to update /proc/self/oom_score_adj:
  # Permission denied"); containerd then keeps it no lower than its own.
  cat >"$nd/containerd/config.toml" <<CT
version = 3
root = "$nd/containerd/root"
state = "$nd/containerd/state"
disabled_plugins = ["io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
  "io.containerd.nri.v1.nri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs"]

[grpc]
  address = "$nd/containerd/containerd.sock"

[ttrpc]
  address = "$nd/containerd/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "$nd/containerd/opt"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$PAUSE_IMAGE"

[plugins."io.containerd.cri.v1.runtime"]
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$nd/cni/net.d"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
CT
  cat >"$nd/cni/net.d/10-disklet-test.conflist" <<CNI
{"cniVersion": "1.0.0", "name": "disklet-test", "plugins": [
  {"type": "bridge", "bridge": "dkl$port", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.$((port % 200 + 20)).$((port / 200 % 250)).0/24"}]],
            "dataDir": "$nd/cni/ipam"}},
  {"type": "loopback"}]}
CNI
  # Eviction and image GC off: this machine's disk is shared with others and its free
  # space moves under us (a node under disk or memory pressure rejects every new pod,
  # reason Evicted), and the imported images can never be pulled again. kubelet ignores
  # a threshold of "0%"; every default signal is named, so none falls back to its default.
  cat >"$nd/kubelet-config.yaml" <<KY
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: $cg
failSwapOn: false
containerRuntimeEndpoint: unix://$nd/containerd/containerd.sock
address: $ip
port: $kp
readOnlyPort: 0
healthzPort: 0
tlsCertFile: $nd/pki/kubelet.crt
tlsPrivateKeyFile: $nd/pki/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
podLogsDir: $nd/pod-logs
volumePluginDir: $nd/kubelet/volume-plugins
enforceNodeAllocatable: []
evictionHard: {memory.available: "0%", nodefs.available: "0%", nodefs.inodesFree: "0%", imagefs.available: "0%", imagefs.inodesFree: "0%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 30
serializeImagePulls: false
KY
  node_start "$dir"
  log "kubelet node $node_name Ready ($ip:$kp, root dir $nd/kubelet)"
}

# The node's VALUE from DIR/cluster.env.
node_env() { # DIR KEY
  sed -n "s/^$2=//p" "$1/cluster.env"
}

# Starts containerd (with the images imported) and the kubelet, and waits for the
# node to be Ready: at `up`, and again after `node-reboot`.
node_start() { # DIR
  local dir=$1 bin nd ip cg c ctr
  bin=$(node_env "$dir" BIN) nd=$(node_env "$dir" NODE_DIR) ip=$(node_env "$dir" NODE_IP)
  cg=$(node_env "$dir" NODE_CGROUP)
  start "$dir" containerd env PATH="$bin:$PATH" "$bin/containerd" --config "$nd/containerd/config.toml"
  wait_for "containerd" 60 "$dir" "$bin/ctr" --address "$nd/containerd/containerd.sock" version
  ctr="$bin/ctr --address $nd/containerd/containerd.sock -n k8s.io"
  $ctr images import "$nd/images/pause.tar" >/dev/null 2>&1
  $ctr images import "$nd/images/busybox.tar" >/dev/null 2>&1
  $ctr images label "$PAUSE_IMAGE" io.cri-containerd.pinned=pinned >/dev/null 2>&1
  $ctr images label "$BUSYBOX_IMAGE" io.cri-containerd.pinned=pinned >/dev/null 2>&1
  # The pods' cgroup root, in every v1 hierarchy (cpuset's needs its cpus and mems).
  for c in $(v1_controllers); do
    mkdir -p "/sys/fs/cgroup/$c$cg"
  done
  if [ -d "/sys/fs/cgroup/cpuset$cg" ]; then
    cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset$cg/cpuset.cpus"
    cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset$cg/cpuset.mems"
  fi
  kubelet_start "$dir"
}

kubelet_start() { # DIR
  local dir=$1 bin nd name
  bin=$(node_env "$dir" BIN) nd=$(node_env "$dir" NODE_DIR) name=$(node_env "$dir" NODE_NAME)
  start "$dir" kubelet "$bin/kubelet" --config="$nd/kubelet-config.yaml" \
    --kubeconfig="$nd/kubelet.kubeconfig" --root-dir="$nd/kubelet" --cert-dir="$nd/kubelet/pki" \
    --hostname-override="$name" --node-ip="$(node_env "$dir" NODE_IP)" \
    --node-labels=disklet.test/real-kubelet=true
  wait_for "node $name Ready (the kubelet)" 120 "$dir" bash -c \
    "'$bin/kubectl' --kubeconfig='$dir/admin.kubeconfig' get node '$name' \
      -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
}

# What a power cut does to the node: every pod's process killed, kubelet, containerd and
# the shims gone, everything they mounted under DIR/node unmounted. Their state on disk
# stays (kubelet's root dir, containerd's root), as it would on a disk.
node_stop() { # DIR
  local dir=$1 nd cg pid pids m f
  nd=$(node_env "$dir" NODE_DIR) cg=$(node_env "$dir" NODE_CGROUP)
  node_valid "$dir" || { log "node_stop: $dir's node env is not node_up's; left alone" && return 1; }
  stop_pid "$dir" kubelet
  # Every process of every pod: SIGKILL to all in the pods' cgroup root, until none is left.
  for _ in $(seq 1 50); do
    pids=$(find "/sys/fs/cgroup/pids$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
    [ -z "$pids" ] && break
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  stop_pid "$dir" containerd
  for pid in $(pgrep -f -- "containerd-shim-runc-v2 .*-address $nd/containerd/containerd.sock" || true); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  # kubelet's own loop devices over the pods' block volumes (it attaches one per mapped
  # device, backed by a file under its root dir), then what they mounted under DIR/node
  # (pod volumes, rootfs overlays, netns, shm), deepest first.
  for f in /sys/block/loop*/loop/backing_file; do
    case "$(cat "$f" 2>/dev/null)" in
      "$nd"/*) losetup -d "/dev/$(basename "$(dirname "$(dirname "$f")")")" 2>/dev/null || true ;;
    esac
  done
  # Again until none is left, as after a real power cut: with kubelet's root rshared, a
  # mount can be stacked over another at one path (propagation), and one pass of umounts
  # can leave one. A pod volume left under the next kubelet's own mount of it makes that
  # kubelet's teardown fail with EBUSY, the pod never gone (seen once in a rehearsal).
  local left
  for _ in $(seq 1 10); do
    left=$(awk -v d="$nd/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r)
    [ -z "$left" ] && break
    for m in $left; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  done
  [ -z "$left" ] || log "node_stop: mounts left under $nd: $left"
}

node_reboot() { # DIR
  local dir
  dir=$(cd "$1" && pwd)
  [ -n "$(node_env "$dir" NODE_CGROUP)" ] || die "node-reboot: $dir has no kubelet node (up it with --kubelet)"
  node_stop "$dir" || true
  node_start "$dir"
}

# Whether DIR's env names a kubelet node exactly as node_up writes it: everything that
# kills, unmounts or deletes is scoped by these values (an empty or odd cgroup would be
# every process of the machine, an empty dir every mount, another bridge eth0).
node_valid() { # DIR
  local cg nd bridge
  cg=$(node_env "$1" NODE_CGROUP) nd=$(node_env "$1" NODE_DIR) bridge=$(node_env "$1" NODE_BRIDGE)
  [[ $cg =~ ^/disklet-test-[0-9]+$ ]] && [[ $bridge =~ ^dkl[0-9]+$ ]] && [ "$nd" = "$1/node" ]
}

# Undoes node_up; every step tolerates what is already gone.
node_down() { # DIR
  local dir=$1 nd cg bridge c k v
  [ -f "$dir/cluster.env" ] || return 0
  [ -n "$(node_env "$dir" NODE_CGROUP)" ] || return 0
  node_valid "$dir" || { log "node_down: $dir's node env is not node_up's; left alone" && return 1; }
  cg=$(node_env "$dir" NODE_CGROUP) nd=$(node_env "$dir" NODE_DIR) bridge=$(node_env "$dir" NODE_BRIDGE)
  node_stop "$dir" || return 1
  for c in $(v1_controllers); do
    [ -d "/sys/fs/cgroup/$c$cg" ] && find "/sys/fs/cgroup/$c$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  [ -n "$bridge" ] && ip link del "$bridge" 2>/dev/null || true
  if [ -f "$nd/sysctl.orig" ]; then
    while IFS== read -r k v; do
      echo "$v" >"/proc/sys/$k" 2>/dev/null || true
    done <"$nd/sysctl.orig"
    rm -f "$nd/sysctl.orig"
  fi
}

# Stops the component whose pid is in DIR/pids/NAME, only while that pid still runs a
# command line naming DIR (a pid the kernel gave to someone else is left alone).
stop_pid() { # DIR NAME
  local f="$1/pids/$2" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$1"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

down() {
  local dir=${1:?usage: down DIR} f name extra=""
  [ -d "$dir/pids" ] || return 0
  dir=$(cd "$dir" && pwd)
  # Best effort, every step (and not under set -e): what cannot be undone now must not
  # keep the control plane running.
  node_down "$dir" || true
  for f in "$dir"/pids/*; do
    [ -f "$f" ] || continue
    case "$(basename "$f")" in
      kwok | kube-scheduler | kube-controller-manager | kube-apiserver | etcd) ;;
      *) extra="$extra $(basename "$f")" ;;
    esac
  done
  for name in $extra kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
    stop_pid "$dir" "$name"
  done
  log "down: $dir"
}

case "${1:-}" in
  build) build ;;
  up) up "${2:-}" "${3:-}" ;;
  kubelet-restart)
    d=$(cd "${2:?usage: kubelet-restart DIR}" && pwd)
    [ -n "$(node_env "$d" NODE_CGROUP)" ] || die "kubelet-restart: $d has no kubelet node (up it with --kubelet)"
    stop_pid "$d" kubelet && kubelet_start "$d"
    ;;
  node-reboot) node_reboot "${2:?usage: node-reboot DIR}" ;;
  down) down "${2:-}" ;;
  sync-mod) sync_mod ;;
  *) die "usage: $0 build | up DIR [--kubelet] | kubelet-restart DIR | node-reboot DIR | down DIR | sync-mod" ;;
esac

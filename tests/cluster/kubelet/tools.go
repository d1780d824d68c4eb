//go:build tools

// Package tools pins the kubelet of the test cluster's kubelet node; the file is
// never compiled, it only keeps it in go.mod. A module of its own so that the
// control plane's cache key does not change with it. See scripts/test-cluster.sh.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kubelet"
)

//go:build tools

// Package tools pins the Kubernetes commands the test cluster builds; the file is
// never compiled, it only keeps them in go.mod. See scripts/test-cluster.sh.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)

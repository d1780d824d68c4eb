//go:build tools

// Package tools pins csi-provisioner for scripts/test-cluster.sh.
package tools

import (
	_ "github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner"
)

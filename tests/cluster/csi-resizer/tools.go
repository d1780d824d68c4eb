//go:build tools

// Package tools pins csi-resizer for scripts/test-cluster.sh.
package tools

import (
	_ "github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer"
)

//go:build tools

// Package tools pins csi-sanity for scripts/test-cluster.sh.
package tools

import _ "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"

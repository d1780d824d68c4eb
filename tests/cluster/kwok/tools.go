//go:build tools

// Package tools pins the kwok command the test cluster builds (scripts/test-cluster.sh).
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"

// Command pause is the pod sandbox's process for the test kubelet node
// (scripts/test-cluster.sh up DIR --kubelet): it holds the pod's namespaces,
// reaps the zombies of a shared PID namespace, and exits on SIGINT or SIGTERM.
// No image registry is reachable from the test machines, so the sandbox image
// is built from this file and imported into containerd.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

// The test node's sandbox ("pause") process: it holds a pod's namespaces, reaps the children it
// inherits as PID 1, and exits on SIGINT or SIGTERM. build.sh builds it static and packs it into
// an image FROM scratch, so the node pulls nothing (registry.k8s.io cannot be reached here).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

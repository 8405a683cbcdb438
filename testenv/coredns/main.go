// CoreDNS for the testenv node's cluster DNS, built from its upstream Go module with only the
// plugins a cluster's Corefile needs (the upstream binary carries every plugin, and their cloud
// SDKs). The plugin order is CoreDNS's own (core/dnsserver/zdirectives.go), cut to these.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"bind", "ready", "health", "errors", "cache", "kubernetes", "forward"}
}

func main() {
	coremain.Run()
}

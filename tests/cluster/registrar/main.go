// Command registrar registers a CSI driver with the kubelet through kubelet's own
// plugin registration API (k8s.io/kubelet/pkg/apis/pluginregistration/v1), the part
// of node-driver-registrar that kubelet sees: it serves GetInfo on a socket in
// kubelet's plugins_registry dir and exits if kubelet refuses the driver.
// node-driver-registrar itself is not served by the Go module proxy the test
// machines reach (403 "This module version is not available"), so the kubelet
// node's tests (tests/kubelet_node.rs) run this in its place.
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"

	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type server struct {
	registerapi.UnimplementedRegistrationServer
	name, endpoint string
}

func (s server) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.name,
		Endpoint:          s.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (s server) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !st.PluginRegistered {
		log.Printf("kubelet refused %s: %s", s.name, st.Error)
		os.Exit(1)
	}
	log.Printf("kubelet registered %s (endpoint %s)", s.name, s.endpoint)
	return &registerapi.RegistrationStatusResponse{}, nil
}

func main() {
	name := flag.String("driver-name", "", "the CSI driver's name")
	endpoint := flag.String("csi-address", "", "the driver's socket path, as kubelet reaches it")
	reg := flag.String("registration-socket", "", "<kubelet root>/plugins_registry/<driver>-reg.sock")
	flag.Parse()
	if *name == "" || *endpoint == "" || *reg == "" {
		log.Fatal("--driver-name, --csi-address and --registration-socket are all required")
	}
	_ = os.Remove(*reg)
	l, err := net.Listen("unix", *reg)
	if err != nil {
		log.Fatalf("listen on %s: %v", *reg, err)
	}
	g := grpc.NewServer()
	registerapi.RegisterRegistrationServer(g, server{name: *name, endpoint: *endpoint})
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sigs
		g.Stop()
		_ = os.Remove(*reg)
		os.Exit(0)
	}()
	if err := g.Serve(l); err != nil {
		log.Fatal(err)
	}
}

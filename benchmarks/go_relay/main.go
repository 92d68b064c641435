// The same bare hop as benchmarks/bare_relay.py, compiled: openlora.v1.Router's Generate and
// GenerateStream relayed as raw bytes to one fixed executor's Generate and GenerateStream, with no
// placement, parsing, auth or metrics; an executor's error status passes on as it came. Beside the
// Python relay it shows what a hop costs on this machine when it is not a Python gRPC stack.
//
//	go_relay PORT EXECUTOR_ADDRESS   (built by benchmarks/cluster.py with Debian's grpc-go, GOPATH mode)
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// raw passes the relayed messages' bytes through unparsed (anything else, the health service's
// messages, goes to the proto codec).
type raw struct{}

var protoCodec = encoding.GetCodec("proto")

func (raw) Marshal(v interface{}) ([]byte, error) {
	if b, ok := v.(*[]byte); ok {
		return *b, nil
	}
	return protoCodec.Marshal(v)
}

func (raw) Unmarshal(data []byte, v interface{}) error {
	if p, ok := v.(*[]byte); ok {
		*p = append((*p)[:0], data...)
		return nil
	}
	return protoCodec.Unmarshal(data, v)
}
func (raw) Name() string   { return "proto" }
func (raw) String() string { return "proto" }

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: go_relay PORT EXECUTOR_ADDRESS")
		os.Exit(2)
	}
	conn, err := grpc.Dial(os.Args[2], grpc.WithInsecure())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	relay := func(_ interface{}, ss grpc.ServerStream) error {
		method, _ := grpc.MethodFromServerStream(ss)
		var req []byte
		if err := ss.RecvMsg(&req); err != nil {
			return err
		}
		ctx, cancel := context.WithCancel(ss.Context())
		defer cancel()
		up, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true},
			"/openlora.v1.Executor/"+path.Base(method), grpc.ForceCodec(raw{}))
		if err != nil {
			return err
		}
		if err := up.SendMsg(&req); err != nil {
			return err
		}
		if err := up.CloseSend(); err != nil {
			return err
		}
		for {
			var msg []byte
			err := up.RecvMsg(&msg)
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return err
			}
			if err := ss.SendMsg(&msg); err != nil {
				return err
			}
		}
	}
	server := grpc.NewServer(grpc.CustomCodec(raw{}), grpc.UnknownServiceHandler(relay))
	checks := health.NewServer()
	checks.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(server, checks)
	lis, err := net.Listen("tcp", "127.0.0.1:"+os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := server.Serve(lis); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

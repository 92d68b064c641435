// A Go client of openlora built from protos/ alone (protoc-gen-go + protoc-gen-go-grpc from Debian's
// packages, grpc-go from golang-google-grpc-dev), as a team using Go would: client-side health
// checking on (grpc.health.v1.Health/Watch), Generate, GenerateStream, and an error code with its
// google.rpc.ErrorInfo detail. Prints one JSON object; tests/test_go_client.py builds and checks it.
//   client ROUTER_ADDRESS ADAPTER_ID
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	openlorav1 "github.com/openlora/openlora/gen/go/openlora/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	_ "google.golang.org/grpc/health" // client-side health checking (Health/Watch)
	"google.golang.org/grpc/status"
)

func main() {
	address, adapter := os.Args[1], os.Args[2]
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, address,
		grpc.WithInsecure(), // grpc-go 1.33 (Debian 12); newer: insecure.NewCredentials()
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"round_robin": {}}],
			"healthCheckConfig": {"serviceName": ""}}`))
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	defer conn.Close()
	router := openlorav1.NewRouterClient(conn)
	out := map[string]any{}
	request := &openlorav1.GenerateRequest{AdapterId: adapter, Prompt: "Hello from Go",
		Sampling: &openlorav1.SamplingParams{MaxNewTokens: 8, IgnoreEos: true}}

	reply, err := router.Generate(ctx, request, grpc.WaitForReady(true))
	if err != nil {
		fmt.Fprintln(os.Stderr, "Generate:", err)
		os.Exit(1)
	}
	out["generate"] = map[string]any{"text": reply.Text, "tokens": len(reply.TokenIds),
		"finish_reason": reply.FinishReason.String()}

	stream, err := router.GenerateStream(ctx, request)
	if err != nil {
		fmt.Fprintln(os.Stderr, "GenerateStream:", err)
		os.Exit(1)
	}
	var text strings.Builder
	chunks, finish := 0, ""
	for {
		chunk, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "GenerateStream.Recv:", err)
			os.Exit(1)
		}
		chunks++
		text.WriteString(chunk.Text)
		finish = chunk.FinishReason.String()
	}
	out["stream"] = map[string]any{"chunks": chunks, "text": text.String(), "finish_reason": finish}

	_, err = router.Generate(ctx, &openlorav1.GenerateRequest{AdapterId: "nobody/nothing", Prompt: "x"})
	st := status.Convert(err)
	reason := ""
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			reason = info.Reason
		}
	}
	out["not_found"] = map[string]any{"code": st.Code().String(), "reason": reason}
	encoded, _ := json.Marshal(out)
	fmt.Println(string(encoded))
}

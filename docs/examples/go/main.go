// nnserve from Go: KServe v2 ModelInfer, the task API's Classify and a streamed Generate.
//
// Generate the Go code from the repository's protos/ (the include root), then build:
//
//	protoc -I protos --go_out=gen --go_opt=module=nnserve.dev/gen/go \
//	    --go-grpc_out=gen --go-grpc_opt=module=nnserve.dev/gen/go \
//	    kserve/v2/model_config.proto kserve/v2/grpc_predict_v2.proto nnserve/v1/tasks.proto
//
// The protos' go_package options name the import paths nnserve.dev/gen/go/inference and
// nnserve.dev/gen/go/nnserve/v1; tests/e2e/test_other_languages.py builds this file against them
// and runs it against a real server. Usage: client HOST:PORT. Prints one JSON object.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"time"

	"google.golang.org/grpc"

	inference "nnserve.dev/gen/go/inference"
	nnservev1 "nnserve.dev/gen/go/nnserve/v1"
)

// Raw tensors are row-major, little-endian bytes.
func toBytes(values []float32) []byte {
	out := make([]byte, 4*len(values))
	for i, v := range values {
		binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(v))
	}
	return out
}

func fromBytes(raw []byte) []float32 {
	out := make([]float32, len(raw)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
	}
	return out
}

type score struct {
	Label       string  `json:"label"`
	Probability float32 `json:"probability"`
}

func run(target string) (map[string]interface{}, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, target, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	out := map[string]interface{}{}

	// KServe v2: the digits FNN takes [n, 64] FP32 pixels scaled to 0..1 (its network tensor).
	pixels := make([]float32, 64)
	natural := make([]float32, 64)
	for i := range pixels {
		pixels[i] = float32(i%16) / 16
		natural[i] = pixels[i] * 16
	}
	kserve := inference.NewGRPCInferenceServiceClient(conn)
	infer, err := kserve.ModelInfer(ctx, &inference.ModelInferRequest{
		ModelName:        "digits-fnn",
		Inputs:           []*inference.ModelInferRequest_InferInputTensor{{Name: "input", Datatype: "FP32", Shape: []int64{1, 64}}},
		RawInputContents: [][]byte{toBytes(pixels)},
	})
	if err != nil {
		return nil, err
	}
	out["infer"] = map[string]interface{}{"shape": infer.Outputs[0].Shape, "logits": fromBytes(infer.RawOutputContents[0])}

	// The task API: the same pixels in the model's natural units (0..16), as typed values.
	tasks := nnservev1.NewTasksClient(conn)
	classified, err := tasks.Classify(ctx, &nnservev1.ClassifyRequest{
		ModelName: "digits-fnn",
		Input:     &nnservev1.ClassifyRequest_Tensor{Tensor: &nnservev1.Tensor{Datatype: "FP32", Shape: []int64{1, 64}, FloatValues: natural}},
		TopK:      3,
	})
	if err != nil {
		return nil, err
	}
	scores := []score{}
	for _, s := range classified.Items[0].Top {
		scores = append(scores, score{s.Label, s.Probability})
	}
	out["classify"] = scores

	// A streamed Generate: text piece by piece, then a Done message. Seed makes it repeatable.
	seed := uint64(5)
	stream, err := tasks.Generate(ctx, &nnservev1.GenerateRequest{ModelName: "chars-lstm", Prompt: "ab", MaxTokens: 12, Seed: &seed})
	if err != nil {
		return nil, err
	}
	text := ""
	for {
		message, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		if piece, ok := message.Event.(*nnservev1.GenerateResponse_Text); ok {
			text += piece.Text
		}
	}
	out["text"] = text
	return out, nil
}

func main() {
	out, err := run(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

"""The gRPC edge: protobuf in and out, numpy towards the core."""

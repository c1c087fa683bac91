"""The servicers: protobuf in, numpy to one call into the core, protobuf out."""

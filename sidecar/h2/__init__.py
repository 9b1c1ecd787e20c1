"""Our own HTTP/2 (framing, HPACK, connections) for the gRPC data path."""

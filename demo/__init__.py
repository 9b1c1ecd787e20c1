"""The bundled demo mesh: users (gRPC), orders (gRPC), products (HTTP/JSON)."""

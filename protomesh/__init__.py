"""protomesh: a gRPC/Protobuf-first service mesh with Python sidecars, an xDS control server and OpenTelemetry on every hop."""

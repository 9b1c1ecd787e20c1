"""The protomesh sidecar: xDS-configured inbound/outbound proxy for HTTP/1.1 and gRPC."""

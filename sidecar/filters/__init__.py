"""Per-policy modules of the sidecar: each parses its Envoy (or meshapi) config message and holds
the pure decision or codec the listeners call."""

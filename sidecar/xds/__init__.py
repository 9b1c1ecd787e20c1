"""The sidecar's side of xDS: one ADS stream, ACK/NACK, reconnects, persisted last-good config."""

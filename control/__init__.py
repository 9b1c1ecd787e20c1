"""The protomesh control server: mesh.yaml + protos + registrations → xDS v3 over ADS."""

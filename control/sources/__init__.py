"""Where the mesh description comes from: mesh.yaml, the services' protos, registrations."""

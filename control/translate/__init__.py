"""Mesh model + registrations → the xDS resources one node should hold."""

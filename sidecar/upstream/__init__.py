"""Upstream side: choosing an endpoint and keeping connections to it."""

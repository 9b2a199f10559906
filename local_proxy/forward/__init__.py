"""Hands each tunnelled request to the local process: HTTP/1.1, h2c and upgrades.
Imports only sidecar.tunnel."""

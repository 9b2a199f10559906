"""offramp's local side: the `offramp` CLI and the proxy that hands stolen requests
to a local process. Packages: cluster (workloads in Kubernetes), forward (to the process)."""

"""offramp's local side: the `offramp` CLI and the proxy that hands stolen requests
to a local process. Packages: cluster (workloads in Kubernetes), forward (to the process),
outgoing (the process's own connections and DNS); env: the pod's environment for it."""

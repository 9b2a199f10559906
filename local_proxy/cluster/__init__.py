"""`offramp steal/status/uninject KIND/NAME`: the only kubernetes shim (kube), the pure
workload decisions and the resolving, injecting and rolling out. Imports the session and below."""

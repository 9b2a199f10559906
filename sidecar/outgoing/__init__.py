"""Outgoing traffic for a session: the local process's connections and DNS leave from the pod.

`rules` reads destinations in mirrord's syntax (shared with the laptop),
`policy` decides what a session may reach, `resolver` forwards DNS to the pod's
nameservers, `dialer` serves the tunnel's CONNECT and DNS streams.
"""

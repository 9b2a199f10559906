"""The local process's outgoing traffic: which connections and DNS queries leave
from the pod, and how they get there.

`filter` decides local or remote per destination (mirrord's outgoing filter),
`dns` answers the local process's DNS queries (through the pod, or here),
`relay` carries each connection (a tunnel CONNECT stream, or a dial from here),
`netns` runs the local process in a namespace whose TCP and DNS come to offramp,
`proxy` serves SOCKS5 and HTTP CONNECT where a namespace cannot be had.
"""

"""Start one container's process: `ip netns exec POD python -m tests.kube.container SPEC`.

`ip netns exec` has already put this process in the pod's network namespace and
a mount namespace of its own; here the pod's volumes are bind-mounted at their
mount paths (visible to this process only) and the container's command is
exec'd, so its pid is the one the kubelet holds.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def main() -> None:
    spec = json.loads(sys.argv[1])
    # Sources are opened before anything is mounted: a mount at /tmp would hide
    # sources that live under /tmp.
    fds = [os.open(m["source"], os.O_PATH) for m in spec["mounts"]]
    mounts = sorted(zip(fds, spec["mounts"], strict=True), key=lambda x: x[1]["target"].count("/"))
    # The emulator's own code (the checkout, the interpreter) stays visible even
    # where a volume covers its parent, as /tmp does when the checkout is there.
    keep = [(os.open(path, os.O_PATH), path) for path in spec["keep"]]
    for fd, m in mounts:
        os.makedirs(m["target"], exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", m["target"], MS_BIND)
        if m.get("readOnly"):
            _mount("none", m["target"], MS_BIND | MS_REMOUNT | MS_RDONLY)
        os.close(fd)
    for fd, path in keep:
        if any(path.startswith(m["target"].rstrip("/") + "/") for _, m in mounts):
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, MS_BIND)
        os.close(fd)
    os.chdir(spec["cwd"])
    os.execvpe(spec["argv"][0], spec["argv"], spec["env"])


if __name__ == "__main__":
    main()

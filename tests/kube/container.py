"""Start one container's process: `ip netns exec POD python -m tests.kube.container SPEC`.

`ip netns exec` has already put this process in the pod's network namespace and
a mount namespace of its own; here the pod's volumes are bind-mounted at their
mount paths (visible to this process only) and the container's command is
exec'd through `setpriv` with the container's uid, gid, bounding set and
no_new_privs, and no ambient or inheritable capability, so its pid is the one
the kubelet holds and it holds what a container's process would.

The emulator's own code (the checkout, the interpreter) must stay reachable
for a non-root uid: an ancestor directory that others may not enter (/root,
where pyenv keeps Python) is covered, in this mount namespace only, by an
empty tmpfs into which just those paths are bound back.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import sys

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, flags: int, data: bytes | None = None) -> None:
    fstype = source.encode() if source == "tmpfs" else None
    if _libc.mount(source.encode(), target.encode(), fstype, flags, data) != 0:
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
    closed = {a for path in spec["keep"] if (a := _closed_ancestor(path))} if spec["uid"] else set()
    for fd, m in mounts:
        if not os.path.isfile(m["target"]):  # a file is mounted over a file
            os.makedirs(m["target"], exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", m["target"], MS_BIND)
        if m.get("readOnly"):
            _mount("none", m["target"], MS_BIND | MS_REMOUNT | MS_RDONLY)
        os.close(fd)
    covered = [m["target"] for _, m in mounts]
    for ancestor in sorted(closed):
        if not any(_under(ancestor, target) for target in covered):
            _mount("tmpfs", ancestor, 0, b"mode=755")
            covered.append(ancestor)
    for fd, path in keep:
        if any(_under(path, target) for target in covered):
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, MS_BIND)
        os.close(fd)
    os.chdir(spec["cwd"])
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in spec["capabilities"])])
    setpriv = [
        "setpriv", f"--reuid={spec['uid']}", f"--regid={spec['gid']}", "--clear-groups",
        "--inh-caps=-all", "--ambient-caps=-all", f"--bounding-set={bounding}",
    ]  # fmt: skip
    if spec["no_new_privs"]:
        setpriv.append("--no-new-privs")
    argv = [*setpriv, "--", *spec["argv"]]
    os.execvpe(argv[0], argv, spec["env"])


def _under(path: str, target: str) -> bool:
    return path.startswith(target.rstrip("/") + "/")


def _closed_ancestor(path: str) -> str | None:
    """The highest ancestor of `path` that others may not enter, if any."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor
    return None


if __name__ == "__main__":
    main()

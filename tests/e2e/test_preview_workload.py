"""Team previews on a workload of 3 replicas, as two developers type it: the link
printed for the Service, `offramp sessions` across every replica, a colleague's
overlapping session refused with who holds it, `--force` taking over (the first is
told and stops), and `offramp sessions --end` by another user."""

from __future__ import annotations

import getpass
import socket
from pathlib import Path

import pytest

from tests.e2e.conftest import NAMESPACE, SIDECAR_IMAGE, Cli, deployment, get, offramp, service
from tests.kube.cluster import Cluster
from tests.support import serving

pytestmark = pytest.mark.timeout(240)

OPEN = "open (steal, port 8080"
ME = f"{getpass.getuser()}@{socket.gethostname()}"


def test_sessions_across_replicas_conflicts_force_and_end(cluster: Cluster, tmp_path: Path) -> None:
    cluster.apply(deployment(replicas=3))
    cluster.apply(service())
    cluster.wait("3 app pods", lambda: len(cluster.ready_pods(NAMESPACE, app="api")) == 3)
    mine = cluster.kubeconfig(tmp_path / "developer", namespace=NAMESPACE)
    theirs = cluster.kubeconfig(tmp_path / "colleague", namespace=NAMESPACE, user="colleague")
    with serving("developer's") as local, serving("colleague's") as other:
        dev = Cli(mine, "steal", "deploy/api", "--to", str(local.port), "--image",
                  SIDECAR_IMAGE, "--preview", "alice")  # fmt: skip
        try:
            link = dev.wait_for("offramp: preview key alice: open ")
            assert f"http://api.{NAMESPACE}/__offramp/preview/alice?to=/ in a browser" in link
            dev.wait_count(OPEN, 3)
            listed = offramp(mine, "sessions", "deploy/api")
            assert listed.returncode == 0, listed.stderr
            rows = [r for r in listed.stdout.splitlines() if f"developer ({ME})" in r]
            assert len(rows) == 3, listed.stdout
            assert len({r.split("/")[0] for r in rows}) == 3, "one per replica"
            assert all("'preview': 'alice'" in r and " since " in r for r in rows), rows

            # The colleague, same key: refused, told who holds it; nothing changed.
            refused = Cli(theirs, "steal", "deploy/api", "--to", str(other.port), "--preview",
                          "alice")  # fmt: skip
            code = refused.finish()
            out = "\n".join(refused.lines)
            assert code == 1, out
            assert f"developer ({ME}) holds these requests in session s" in out, out
            assert "the same preview key alice" in out and "--force" in out
            pod = cluster.ready_pods(NAMESPACE, app="api")[0]["status"]["podIP"]
            assert get(pod, 8080, "/", {"x-offramp-preview": "alice"})["served_by"] == "developer's"

            # --force takes over: the developer is told and stops.
            taker = Cli(theirs, "steal", "deploy/api", "--to", str(other.port), "--preview",
                        "alice", "--force")  # fmt: skip
            try:
                taker.wait_count(OPEN, 3)
                assert dev.finish() == 1
                said = "\n".join(dev.lines)
                assert f"taken over by colleague ({ME}) (--force" in said, said
                for p in cluster.ready_pods(NAMESPACE, app="api"):
                    answer = get(p["status"]["podIP"], 8080, "/", {"x-offramp-preview": "alice"})
                    assert answer["served_by"] == "colleague's", answer

                # The developer ends the colleague's sessions: they are told who.
                ended = offramp(mine, "sessions", "deploy/api", "--end", f"colleague ({ME})")
                assert ended.returncode == 0, ended.stderr
                assert ended.stdout.count("offramp: ended ") >= 1, ended.stdout
                assert ended.stdout.count(f"of colleague ({ME})") == 3, ended.stdout
                assert taker.finish() == 1
                assert f"ended by developer ({ME})" in "\n".join(taker.lines)
            finally:
                taker.stop()
            left = offramp(mine, "sessions", "deploy/api").stdout
            assert "no open session on 3 ready pod(s)" in left, left
        finally:
            dev.stop()

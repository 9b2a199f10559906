"""Destinations in mirrord's syntax, and the sidecar's outgoing policy, as tables."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from sidecar.outgoing.policy import OutgoingPolicy
from sidecar.outgoing.resolver import ResolvConf
from sidecar.outgoing.rules import Protocol, RuleError, parse_rule, parse_rules

pytestmark = pytest.mark.timeout(10)

ip = ipaddress.ip_address
TCP = Protocol.TCP


@pytest.mark.parametrize(
    ("rule", "port", "address", "name", "matches"),
    [
        ("app-db", 5432, None, "app-db", True),
        ("app-db", 5432, None, "app-db.shop.svc.cluster.local.", True),
        ("app-db", 5432, None, "my-app-db", False),  # mirrord would: a substring
        ("app-db", 5432, None, "app-dbx", False),
        ("App-DB", 5432, None, "app-db", True),
        ("app-db:5432", 5433, None, "app-db", False),
        (":8888", 8888, ip("10.0.0.1"), None, True),
        (":8888", 8889, ip("10.0.0.1"), None, False),
        ("10.0.0.0/8", 80, ip("10.1.2.3"), None, True),
        ("10.0.0.0/8", 80, ip("11.1.2.3"), None, False),
        ("10.0.0.0/8", 80, None, "app-db", False),
        ("tcp://1.2.3.4:80", 80, ip("1.2.3.4"), None, True),
        ("udp://:53", 53, ip("1.2.3.4"), None, False),  # asked as TCP
        ("[::1]:6379", 6379, ip("::1"), None, True),
        ("::1", 6379, ip("::1"), None, True),
    ],
)
def test_rules_match(rule: str, port: int, address: object, name: str | None,
                     matches: bool) -> None:  # fmt: skip
    assert parse_rule(rule).matches(TCP, port, address, name) is matches  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "it is empty"),
        ("ftp://host", "no protocol"),
        ("host:99999", "not a port"),
        ("host:", "not a port"),
        ("10.0.0.0/99", "not a subnet"),
        ("bad name!", "neither an address nor a host name"),
        ("[::1", "not closed"),
        (":", "not a port"),
    ],
)
def test_bad_rules_say_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(RuleError, match=error) as e:
        parse_rule(text)
    assert "e.g. app-db" in str(e.value)


POLICY = OutgoingPolicy(frozenset({15080, 15081}), frozenset({ip("10.0.0.7")}))


@pytest.mark.parametrize(
    ("address", "port", "named", "reason"),
    [
        ("10.96.0.10", 8080, (), None),
        ("127.0.0.1", 9901, (), "the pod's own loopback"),
        ("127.0.0.1", 9901, ("127.0.0.1:9901",), None),
        ("127.0.0.1", 9901, (":9901",), "the pod's own loopback"),  # a port alone names no host
        ("169.254.169.254", 80, (), "link-local (cloud metadata)"),
        ("169.254.169.254", 80, ("169.254.169.254",), None),
        ("fd00:ec2::254", 80, (), "cloud metadata"),
        ("10.0.0.7", 15081, (), "a port of the offramp sidecar itself"),
        ("10.0.0.8", 15081, (), None),  # another pod's sidecar port is not ours
        ("10.0.0.7", 8080, (), None),
    ],
)
def test_policy_guards(address: str, port: int, named: tuple[str, ...],
                       reason: str | None) -> None:  # fmt: skip
    got = POLICY.check(TCP, ip(address), port, None, parse_rules(named))
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got and "--remote" in got


def test_the_admins_allow_list_narrows_even_what_was_named() -> None:
    policy = OutgoingPolicy(frozenset(), allow=parse_rules(["payment-service", "10.96.0.0/12:443"]))
    assert policy.check(TCP, ip("10.96.0.5"), 443, None, ()) is None
    assert policy.check(TCP, ip("10.1.0.5"), 80, "payment-service.default", ()) is None
    refused = policy.check(TCP, ip("10.1.0.5"), 80, None, parse_rules(["10.1.0.5"]))
    assert refused is not None and "allow-list" in refused
    assert "offramp.dev/outgoing-allow" in refused


def test_resolv_conf_as_glibc_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(
        "# comment\nnameserver 10.96.0.10\nnameserver 10.96.0.11 ; trailing\n"
        "domain old.example\nsearch shop.svc.cluster.local svc.cluster.local\n"
        "options ndots:5 timeout:1\n"
    )
    conf = ResolvConf.read(path)
    assert conf.nameservers == ("10.96.0.10", "10.96.0.11")
    assert conf.search == ("shop.svc.cluster.local", "svc.cluster.local")
    assert conf.ndots == 5
    assert ResolvConf.read(tmp_path / "missing") == ResolvConf()

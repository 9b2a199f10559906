"""mirrord's outgoing filter on the laptop: local or remote, DNS, loopback ports."""

from __future__ import annotations

import ipaddress

import pytest

from local_proxy.outgoing.filter import NameBook, OutgoingFilter, Route
from sidecar.outgoing.rules import Protocol, RuleError

pytestmark = pytest.mark.timeout(10)

ip = ipaddress.ip_address


def test_no_filter_sends_everything_but_loopback_to_the_pod() -> None:
    f = OutgoingFilter.build([], [])
    assert f.route(5432, ip("10.0.0.5"), None) is Route.REMOTE
    assert f.route(5432, None, "app-db") is Route.REMOTE
    assert f.route(5432, ip("127.0.0.1"), None) is Route.LOCAL
    assert f.dns_route("app-db") is Route.REMOTE
    assert f.loopback_ports == ()


def test_a_local_list_keeps_what_it_matches_here() -> None:
    f = OutgoingFilter.build(["app-db", ":8888"], [])
    assert f.route(5432, ip("10.0.0.5"), "app-db.default.svc.cluster.local") is Route.LOCAL
    assert f.route(5432, ip("10.0.0.5"), "my-app-db") is Route.REMOTE
    assert f.route(8888, ip("10.0.0.9"), None) is Route.LOCAL
    assert f.route(80, ip("10.0.0.9"), None) is Route.REMOTE
    assert f.dns_route("app-db") is Route.LOCAL
    assert f.dns_route("app-db.default.svc.cluster.local") is Route.LOCAL
    assert f.dns_route("payment-service") is Route.REMOTE
    assert f.loopback_ports == (8888,)


def test_a_remote_list_sends_only_what_it_matches_to_the_pod() -> None:
    f = OutgoingFilter.build([], ["payment-service", "127.0.0.1:9901"])
    assert f.route(8080, ip("10.0.0.5"), "payment-service.default") is Route.REMOTE
    assert f.route(8080, ip("10.0.0.5"), "other") is Route.LOCAL
    assert f.route(9901, ip("127.0.0.1"), None) is Route.REMOTE
    assert f.loopback_ports == (9901,)
    assert f.named == ("payment-service", "127.0.0.1:9901")


def test_local_and_remote_together_are_refused() -> None:
    with pytest.raises(RuleError, match="either local or remote"):
        OutgoingFilter.build(["a"], ["b"])


def test_off_switches() -> None:
    f = OutgoingFilter.build([], [], tcp=False, dns=False, udp=False)
    assert not f.enabled
    assert f.route(80, ip("10.0.0.5"), None) is Route.LOCAL
    assert f.route(53, ip("10.0.0.5"), None, Protocol.UDP) is Route.LOCAL
    assert f.dns_route("payment-service") is Route.LOCAL
    # UDP alone: its own switch, and udp:// entries in the filter.
    udp_only = OutgoingFilter.build(["udp://:8125"], [], tcp=False, dns=False)
    assert udp_only.enabled
    assert udp_only.route(80, ip("10.0.0.5"), None) is Route.LOCAL
    assert udp_only.route(8125, ip("10.0.0.5"), None, Protocol.UDP) is Route.LOCAL
    assert udp_only.route(514, ip("10.0.0.5"), None, Protocol.UDP) is Route.REMOTE


def test_the_name_book_remembers_the_latest_names_up_to_its_size() -> None:
    book = NameBook(size=2)
    book.learn("a.example.", [ip("10.0.0.1")])
    book.learn("B.example", [ip("10.0.0.2"), ip("10.0.0.3")])
    assert book.name_of(ip("10.0.0.1")) is None
    assert book.name_of(ip("10.0.0.2")) == "b.example"

"""The Helm chart, rendered and linted by Helm's own engine (helm-python-sdk, no
helm binary), every manifest checked against the Kubernetes schemas.

cert-manager's Issuer and Certificate are custom resources the Kubernetes
schemas do not cover; they are checked for the fields cert-manager requires."""

from __future__ import annotations

import base64
import re
import shlex
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from sidecar.cli import webhook_parser
from sidecar.inject.patch import default_resources

CHART = Path(__file__).resolve().parents[2] / "charts" / "offramp"
K8S = "1.30"
NAMESPACE = "offramp-system"
NON_DEFAULT = {
    "image": {"repository": "registry.example:5000/team/offramp", "tag": "0.1.0-rc1"},
    "sidecar": {
        "captureMode": "none",
        "probeProtection": False,
        "tokenSecret": "preview-token",
        "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": 1, "memory": "512Mi"}},
    },
    "previewHeader": "x-dev-key",
    "webhook": {"replicas": 2, "port": 9443, "certManager": {"enabled": True}},
    "rbac": {"exampleBinding": {"enabled": True, "namespace": "shop", "group": "shop-devs"}},
}


def render(values: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], str]:
    chart = helm.Chart.load(CHART)
    out = chart.render(values, name="offramp", namespace=NAMESPACE, is_install=True)
    notes = out.pop("offramp/templates/NOTES.txt")
    objects = [
        doc for text in out.values() for doc in yaml.safe_load_all(text) if isinstance(doc, dict)
    ]
    return objects, notes


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = by_kind(objects, kind)
    return found


@pytest.mark.parametrize("values", [None, NON_DEFAULT], ids=["defaults", "non-defaults"])
def test_every_rendered_manifest_passes_the_kubernetes_schemas(
    values: dict[str, Any] | None,
) -> None:
    objects, _ = render(values)
    kinds = sorted(o["kind"] for o in objects)
    expected = [
        "ClusterRole", "Deployment", "MutatingWebhookConfiguration", "Service", "ServiceAccount",
    ]  # fmt: skip
    if values:
        expected += ["Certificate", "Issuer", "RoleBinding"]
    else:
        expected += ["Secret"]
    assert kinds == sorted(expected)
    for obj in objects:
        if obj["apiVersion"].startswith("cert-manager.io/"):
            assert obj["metadata"]["namespace"] == NAMESPACE
            continue
        kubernetes_validate.validate(obj, K8S, strict=True)


@pytest.mark.parametrize("values", [None, NON_DEFAULT], ids=["defaults", "non-defaults"])
def test_it_lints_clean(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    # Severity 1 is information ("icon is recommended"); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_generated_certificate_is_trusted_by_the_webhook_configuration() -> None:
    objects, _ = render()
    secret = one(objects, "Secret")
    config = one(objects, "MutatingWebhookConfiguration")
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    host = f"offramp-webhook.{NAMESPACE}.svc"
    assert host in names.get_values_for_type(x509.DNSName)
    for hook in config["webhooks"]:
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == base64.b64decode(
            secret["data"]["ca.crt"]
        )
        assert hook["failurePolicy"] == "Ignore"
        service = hook["clientConfig"]["service"]
        assert (service["name"], service["namespace"]) == ("offramp-webhook", NAMESPACE)


def test_with_cert_manager_the_ca_bundle_is_injected_from_its_certificate() -> None:
    objects, _ = render(NON_DEFAULT)
    config = one(objects, "MutatingWebhookConfiguration")
    certificate = one(objects, "Certificate")
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{NAMESPACE}/{certificate['metadata']['name']}"
    )
    assert all("caBundle" not in hook["clientConfig"] for hook in config["webhooks"])
    deployment = one(objects, "Deployment")
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    issuer = one(objects, "Issuer")
    assert certificate["spec"]["issuerRef"] == {
        "kind": "Issuer",
        "name": issuer["metadata"]["name"],
    }


def test_the_webhooks_split_pods_by_namespace_and_never_touch_kube_system_or_their_own() -> None:
    objects, _ = render()
    hooks = {h["name"]: h for h in one(objects, "MutatingWebhookConfiguration")["webhooks"]}
    assert set(hooks) == {"namespace.inject.offramp.dev", "pod.inject.offramp.dev"}
    for scope, operator in (("namespace", "In"), ("pod", "NotIn")):
        hook = hooks[f"{scope}.inject.offramp.dev"]
        assert hook["clientConfig"]["service"]["path"] == f"/mutate/{scope}"
        opt_in, excluded = hook["namespaceSelector"]["matchExpressions"]
        assert opt_in == {"key": "offramp.dev/inject", "operator": operator, "values": ["true"]}
        assert excluded["operator"] == "NotIn"
        assert set(excluded["values"]) == {"kube-system", NAMESPACE}
        assert hook["rules"] == [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]


@pytest.mark.parametrize("values", [None, NON_DEFAULT], ids=["defaults", "non-defaults"])
def test_the_webhook_command_line_is_one_the_webhook_accepts(
    values: dict[str, Any] | None,
) -> None:
    objects, _ = render(values)
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "webhook"
    args = webhook_parser().parse_args(container["args"][1:])
    assert args.image == container["image"]
    assert args.namespace == NAMESPACE
    if values:
        assert container["image"] == "registry.example:5000/team/offramp:0.1.0-rc1"
        assert (args.capture, args.token_secret, args.port) == ("none", "preview-token", 9443)
        assert args.no_probe_protection is True
        # Helm merges maps: the default memory request stays.
        assert args.resources == {
            "requests": {"cpu": "100m", "memory": "32Mi"},
            "limits": {"cpu": "1", "memory": "512Mi"},
        }
    else:
        assert container["image"] == "registry.example/offramp-sidecar:0.1.0"
        assert (args.capture, args.token_secret, args.port) == ("iptables", "offramp-token", 8443)
        assert args.resources == default_resources()


def test_the_user_role_grants_only_what_the_cli_does() -> None:
    objects, _ = render(NON_DEFAULT)
    role = one(objects, "ClusterRole")
    assert role["metadata"]["name"] == "offramp-user"
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert not any(verb in ("*", "delete", "deletecollection", "escalate", "bind", "impersonate")
                   for _, _, verb in granted)  # fmt: skip
    assert not any("*" in (group, resource) for group, resource, _ in granted)
    assert ("apps", "deployments", "patch") in granted
    assert ("", "pods/portforward", "create") in granted
    binding = one(objects, "RoleBinding")
    assert binding["metadata"]["namespace"] == "shop"
    assert binding["roleRef"]["name"] == "offramp-user"
    assert binding["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "shop-devs"}
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sidecar": {"captureMode": "ebpf"}}, "at '/sidecar/captureMode': value must be one of"),
        ({"webhook": {"port": "https"}}, "at '/webhook/port': got string, want integer"),
        ({"sidecar": {"resources": {"requests": {"memory": "lots"}}}}, "/sidecar/resources"),
        ({"image": {"tag": "has space"}}, "at '/image/tag'"),
        ({"previewHeader": "x preview"}, "at '/previewHeader'"),
        ({"webhook": {"timeoutSeconds": 60}}, "at '/webhook/timeoutSeconds'"),
        ({"sidecars": {}}, "additional properties 'sidecars' not allowed"),
    ],
)
def test_bad_values_are_refused_with_the_key_and_the_reason(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        render(values)
    assert message in str(refused.value)


def test_notes_tell_the_user_what_to_run_next() -> None:
    _, notes = render(NON_DEFAULT)
    assert "kubectl label namespace <ns> offramp.dev/inject=true" in notes
    assert "create secret generic preview-token" in notes
    assert "--clusterrole=offramp-user" in notes
    assert "^x-dev-key: <their key>$" in notes
    assert "privilege-free" in notes
    # Each command shown runs as written: its quoting is balanced.
    for line in notes.splitlines():
        if line.strip().startswith(("kubectl", "offramp")):
            shlex.split(line.rstrip("\\ &"))


def test_the_chart_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-zA-Z.]+)` \|", readme, re.M))

    def leaves(node: dict[str, Any], prefix: str = "") -> set[str]:
        out = set()
        for key, value in node.items():
            path = f"{prefix}{key}"
            # A map of Kubernetes fields (resources) is documented as one value.
            if isinstance(value, dict) and value and not key.endswith("resources"):
                out |= leaves(value, path + ".")
            else:
                out.add(path)
        return out

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert leaves(values) == documented

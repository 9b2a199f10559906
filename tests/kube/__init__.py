"""A Kubernetes API emulator, strict enough for `offramp steal KIND/NAME` to run as typed.

What it emulates, to the unmodified official `kubernetes` Python client:
- REST: get, list (labelSelector with =, ==, != and existence), watch (chunked
  JSON lines from a resourceVersion, or the current objects as ADDED first),
  create, patch and delete of Namespaces, Pods, Services, Secrets, Deployments
  and StatefulSets. Errors are Status objects with the real codes and reasons
  (401, 403, 404, 409 AlreadyExists/Conflict, 415, 422).
- Patches: JSON Patch (RFC 6902) applied by `jsonpatch`, including `test`
  operations; merge patch (RFC 7386). Strategic merge patch is refused (415).
- Validation: every object stored, by anyone, passes kubernetes-validate
  (OpenAPI schemas of 1.30, strict), plus what the schemas cannot say and
  offramp's path touches: DNS names, unique container names, IANA port names
  unique in the pod, probes naming a port of their own container, a
  Deployment's selector matching its template. Otherwise: 422 Invalid.
- Authentication by bearer token, and RBAC: the developer's rules are the
  chart's offramp-user ClusterRole, bound in the namespaces the test names; a
  websocket port-forward needs `get` and `create` on pods/portforward, as the
  API server asks since 1.30.
- pods/portforward over a websocket with the `v4.channel.k8s.io` framing (a
  data and an error channel per port, each opened by its port number).
- Controllers: Deployment rolling updates (maxSurge/maxUnavailable) and
  StatefulSet ordered rollouts (controllers.py); PodSecurity admission of the
  pods they create (`enforce` label: baseline and restricted capability rules).
- A kubelet that runs each pod as a network namespace with real processes and
  real readiness probes (kubelet.py says exactly how).

What it does not: ReplicaSets, Endpoints/EndpointSlices (tests resolve a
Service's targetPort themselves with `Cluster.endpoints`), kube-proxy,
generateName, finalizers, server-side apply, field selectors, discovery, TLS
(it serves plain HTTP on 127.0.0.1), resourceVersion compaction (a watch from
any version replays what followed), users and capabilities inside pods.
"""

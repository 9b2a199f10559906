# The offramp sidecar image. The same image runs the injector webhook
# (`offramp-sidecar webhook ...`, see charts/offramp).
#
# Build it from the repository root, and push it where your cluster pulls from:
#
#     docker build -t registry.corp/team/offramp-sidecar:0.1.0 .
#     docker push registry.corp/team/offramp-sidecar:0.1.0
#
# Where no registry is reachable (CI), scripts/build-image builds it with
# buildah against a local stand-in for python:3.12-slim.
#
# It runs as an unprivileged user (uid 10001). iptables capture needs the
# NET_ADMIN capability, which the injected pod spec grants to this container
# only (never `privileged`); the iptables (nft) and ss binaries carry it as a
# file capability so that the unprivileged user can use it. A file capability
# must stay within what the container may hold: the kernel refuses to run a
# binary whose permitted file capabilities include one outside the container's
# bounding set. So iptables-nft and ss carry exactly NET_ADMIN, what the
# injection grants; iptables-legacy also needs NET_RAW (it talks to the kernel
# through a raw socket) and runs only where the pod grants that too
# (--iptables iptables-legacy by hand).

# --- build: a virtualenv with the pinned dependencies and offramp --------------
FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/offramp
COPY requirements/sidecar.txt /tmp/sidecar.txt
RUN /opt/offramp/bin/pip install --no-deps -r /tmp/sidecar.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY local_proxy ./local_proxy
RUN /opt/offramp/bin/pip install --no-deps . \
    && /opt/offramp/bin/pip uninstall --yes --quiet pip \
    && find /opt/offramp -name '__pycache__' -prune -exec rm -rf {} +

# --- run ------------------------------------------------------------------------
FROM python:3.12-slim
# libcap2-bin (setcap) stays: iproute2, which has ss, depends on it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables iproute2 libcap2-bin \
    && setcap cap_net_admin+ep /usr/sbin/xtables-nft-multi \
    && setcap cap_net_admin,cap_net_raw+ep /usr/sbin/xtables-legacy-multi \
    && setcap cap_net_admin+ep /bin/ss \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin offramp
COPY --from=build /opt/offramp /opt/offramp
# The root filesystem is read-only in the pod; /tmp is an emptyDir there.
ENV PATH=/opt/offramp/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XTABLES_LOCKFILE=/tmp/xtables.lock
USER 10001
EXPOSE 15080 15081 8443
ENTRYPOINT ["offramp-sidecar"]

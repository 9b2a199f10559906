"""offramp's sidecar: a mitmproxy-based proxy in front of the app, plus the session server.

Packages: tunnel (the wire), sessions (who wants which request), proxy (the engine),
inject (the pod patch and webhook), outgoing (a session's connections from the pod);
capture, settings, appenv (the app's environment) and cli at the top."""

__all__ = ["__version__"]

__version__ = "0.1.0"

"""offramp's sidecar: a mitmproxy-based proxy in front of the app, plus the session server."""

__all__ = ["__version__"]

__version__ = "0.1.0"

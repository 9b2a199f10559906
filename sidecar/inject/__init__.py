"""Injection: the pure patch that adds or removes the sidecar, the admission decision and
the webhook server. Imports only sidecar.settings; the laptop side imports the patch."""

"""Who wants which request: the session spec, filters, the router, the registry of open
sessions and the session (control) server. Imports the tunnel, settings and capture."""

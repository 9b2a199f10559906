"""The wire both ends speak: the tunnel protocol (no I/O), its websocket driver, an
HTTP/2 endpoint with pumps onto tunnel streams, and splicing. Imports nothing else of offramp."""

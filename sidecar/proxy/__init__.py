"""The proxy engine: the embedded mitmproxy master, its addon, protocol detection, the
gateway for stolen requests and the workers. Imports sessions and below; nothing on the
laptop side imports it."""

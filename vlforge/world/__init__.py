"""The demo world: rendered shapes with known truth, a URL list and a faulty loopback server."""

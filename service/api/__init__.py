"""The HTTP API: Litestar app factory, routes, auth and problem details."""

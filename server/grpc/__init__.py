"""The gRPC edge: server lifecycle, servicers, protobuf ↔ domain conversion, auth, the status table,
the client and the generated code (``pb``).

The only subpackage that imports protobuf. Servicers call the engine's public API
(:mod:`loraswap.server.engine`) with domain objects and raise domain errors; ``status`` maps them to
status codes for both the server's interceptor and the client.
"""

"""The gRPC edge: server lifecycle, servicers, protobuf ↔ domain conversion, the auth interceptor, the
status codes, the client and the generated code (``pb``).

With the other gRPC edges (``ray``'s ingress, ``health_cli``, ``cli``), the only code that imports gRPC
or protobuf; the rules it shares with the HTTP edge (tokens, the status table) live in pure-Python
modules beside it (:mod:`loraswap.server.auth`, :mod:`loraswap.server.status`). Servicers call the
engine's public API (:mod:`loraswap.server.engine`) with domain objects and raise domain errors;
``status`` maps them to status codes for both the server's interceptor and the client.
"""

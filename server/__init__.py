"""loraswap.server: the inference server, along the request path.

- :mod:`~loraswap.server.grpc`: the network edge (servicers, protobuf conversion, auth, status codes,
  the client); the only subpackage that imports protobuf.
- :mod:`~loraswap.server.http`: the OpenAI-compatible HTTP edge (FastAPI on uvicorn), beside gRPC in the
  same process and on the same engine; ``limits`` holds the request checks both edges share.
- :mod:`~loraswap.server.engine`: the Engine (admission, scheduling, the packed forward, sampling,
  detokenization) over one resident base model.
- :mod:`~loraswap.server.adapters`: the adapter tiers (registry → disk cache → host RAM → device slot).
- :mod:`~loraswap.server.lora`: the batched LoRA layers, their slot buffers and ops.
- ``settings`` (``loraswap serve`` configuration), ``metrics`` (every Prometheus metric), ``cli``.

Imports point down the path: grpc / http → engine → adapters → lora; nothing below imports what is above it
(adapters and lora read only the engine's public data types in ``engine.api``).
"""

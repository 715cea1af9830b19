"""loraswap.server: the inference server, along the request path.

- :mod:`~loraswap.server.grpc`: the gRPC edge (servicers, protobuf conversion, the auth interceptor,
  status codes, the client). It and the other gRPC edges (``ray``'s ingress, ``health_cli``, ``cli``)
  are the only modules that import gRPC or protobuf (``tests/test_layering.py`` reads the imports).
- :mod:`~loraswap.server.http`: the OpenAI-compatible HTTP edge (FastAPI on uvicorn), beside gRPC in the
  same process and on the same engine. What both edges share is pure Python beside them: ``limits`` (the
  request checks and the one generation budget), ``auth`` (the token rule), ``status`` (the one table
  from domain errors to each edge's status) and ``engine_slot`` (the engine they serve).
- :mod:`~loraswap.server.engine`: the Engine (admission, scheduling, the packed forward, sampling,
  detokenization) over one resident base model.
- :mod:`~loraswap.server.adapters`: the adapter tiers (registry → disk cache → host RAM → device slot).
- :mod:`~loraswap.server.lora`: the batched LoRA layers, their slot buffers and ops.
- ``settings`` (``loraswap serve`` configuration), ``metrics`` (every Prometheus metric), ``cli``.

Imports point down the path: grpc / http → engine → adapters → lora; nothing below imports what is above it
(adapters and lora read only the engine's public data types in ``engine.api``).
"""

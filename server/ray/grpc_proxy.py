"""What Ray Serve's gRPC proxy imports to serve ``loraswap.v1.Inference`` (``grpc_servicer_functions``).

The proxy pickles each request message on its way to the ingress replica. The generated messages name
their module after the proto package (``loraswap.v1.inference_pb2``) while the code lives at
``loraswap.server.grpc.pb.inference_pb2``, so pickle could not find the class: importing this module (the
proxy does, through the servicer function; the ingress does, through :mod:`~loraswap.server.ray.ingress`)
makes that name refer to the same module.
"""

from __future__ import annotations

import sys

from loraswap.server.grpc.pb import inference_pb2, inference_pb2_grpc

PROTO_MODULE = inference_pb2.GenerateRequest.__module__
sys.modules.setdefault(PROTO_MODULE, inference_pb2)

add_InferenceServicer_to_server = inference_pb2_grpc.add_InferenceServicer_to_server
"""The generated servicer function, re-exported so that importing it installs the alias above."""

"""Server reflection under both protocol names: ``grpc.reflection.v1`` (the one grpcurl and other tools
ask first) and the older ``grpc.reflection.v1alpha``.

grpcio-reflection (1.85) implements only v1alpha (grpc/grpc#38576). v1 is the same protocol under a new
package name: its messages have the same fields with the same numbers and types, so the bytes on the wire
are the same, and the v1alpha servicer answers v1 calls as they are. A v1 copy of the v1alpha file
descriptor (package renamed) goes into the default descriptor pool, so that the v1 service can itself be
described, as tools expect of every listed service.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"  # its path in grpc-proto
REFLECTION_SERVICES = (V1_SERVICE, reflection.SERVICE_NAME)


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection over ``service_names`` (and the two reflection services) on ``server``."""
    _add_v1_descriptor()
    servicer = reflection.ReflectionServicer((*service_names, *REFLECTION_SERVICES))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)  # v1alpha
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": v1})]
    )


def _v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The v1alpha file descriptor with its package, and the type names that carry it, renamed to v1."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    old, new = f".{proto.package}.", f".{V1_PACKAGE}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")  # v1alpha's Java/Go package names and its deprecation mark
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):  # set only on message fields; assigning "" would set it
                field.type_name = new + field.type_name[len(old) :]
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    return proto


def _add_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(V1_SERVICE)  # already there: added before, or another copy of v1 is loaded
    except KeyError:
        pool.Add(_v1_file_descriptor())

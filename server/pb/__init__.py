"""Generated from protos/loraswap/v1/*.proto by loraswap.server.protogen; do not edit."""

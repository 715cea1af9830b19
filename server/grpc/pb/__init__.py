"""Generated from protos/loraswap/v1/*.proto by loraswap.devtools.protogen; do not edit."""

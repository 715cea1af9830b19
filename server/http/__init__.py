"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), served beside gRPC over the same engine."""

"""`harli serve`: the OpenAI-compatible HTTP API over the engine (FastAPI, uvicorn, prometheus_client)."""

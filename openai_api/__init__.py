"""The OpenAI-compatible API: request/response schemas, errors, streaming text, routes."""

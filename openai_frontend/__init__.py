"""OpenAI-compatible FastAPI frontend over the Triton models (see README: "OpenAI-compatible API")."""

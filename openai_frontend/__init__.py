"""OpenAI-compatible FastAPI frontend over Triton (routes arrive with the frontend work)."""

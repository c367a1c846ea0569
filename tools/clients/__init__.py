"""Clients of the served models: tritonclient helpers for the llm and diffusion models, an in-process engine sink."""

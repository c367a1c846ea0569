"""Shared code of the Triton Python-backend models (llm, diffusion): the model.py shims only delegate here."""

"""Where adapters live and what their names mean; torch-free, so the frontend shares it with the backends."""

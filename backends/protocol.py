"""What our Triton models and their clients (the frontend) agree on beyond the tensors in config.pbtxt."""

from __future__ import annotations

# Decoupled models answer over gRPC streams, whose errors carry only a message (no status code): these prefixes
# let clients tell a retryable or internal failure from a bad request.
UNAVAILABLE_PREFIX = "model unavailable: "
INTERNAL_PREFIX = "internal error: "

# Request parameter of a supervisor's liveness probe: the model answers at once without any model work (an
# empty final response for text models, no images for diffusion models), or UNAVAILABLE when it cannot serve.
PROBE_PARAMETER = "multilora_probe"

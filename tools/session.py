"""Names the test session and the GPU check agree on: the extra models the session's tritonserver serves (built
by tests/conftest.py), the frontend's keys, and the switch that runs the GPU tests on CPU."""

TIGHT_MODEL = "llm_tight"  # the llm model with 2 LoRA slots and no static adapters, loaded by the tests needing it
PINNED_MODEL = "llm_pinned"  # the llm model whose only LoRA slot holds a pinned adapter, loaded by the tests needing it
SD15_MODEL = "diffusion_sd15"  # the diffusion model serving the tiny SD1.5-style pipeline
BATCHED_MODEL = "diffusion_batched"  # the diffusion model whose batcher waits for 4 requests (mixed-batch proof)
PHI3_MODEL = "llm_phi3"  # the llm model serving the tiny random Phi-3 (fused projections), loaded by its test
BF16_MODEL = "llm_bf16"  # the llm model in bfloat16 (the CPU default where AVX512-BF16 is), loaded by its tests

API_KEY, ADMIN_KEY = "test-api-key", "test-admin-key"  # the session's frontend

# scripts/gpu_check --cpu sets this: GPU tests marked `cpu_dry_run` then run on CPU (small), so they cannot rot.
CHECK_DEVICE_ENV = "MULTILORA_CHECK_DEVICE"

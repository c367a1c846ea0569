"""LoRA shared by the llm and diffusion models, in five layers (docs/architecture.md):

- `adapters/`: an adapter as data: file names, the PEFT config, readers and validators of PEFT folders and
  diffusers/kohya files, which layers of a model take LoRA.
- `store/`: where adapters live and what names mean: s3:// locations and downloads, the registry (static, dynamic
  file or object, resolver dirs), allowed roots, stable ids. Torch-free: the frontend imports it.
- `manager/`: serving adapters to one model: the request contract, selection (validated before a request is
  queued), the tiered LRU cache of device slots and host copies, the config parameters, metrics.
- `layers/`: LoRA-wrapped linears and convolutions sharing one `LoRAContext` (the slot buffers).
- `ops/`: the math behind one seam: a `LoRABatch` built once per forward, a `LoRAOps` backend (torch, or Triton
  kernels on CUDA) that every layer calls once.
"""

"""Diffusion serving: pipeline loading, per-row LoRA over the whole pipeline, batching, PNG encoding;
`TritonDiffusionModel` is the Triton model."""


def __getattr__(name: str):
    # Lazy, so tools and tests can import backends.diffusion.* without Triton's pb_utils (only in the stub).
    if name == "TritonDiffusionModel":
        from backends.diffusion.triton_model import TritonDiffusionModel

        return TritonDiffusionModel
    raise AttributeError(name)

"""The diffusion model's counters and its LoRA metrics, through the Python backend's custom metrics API (Triton's
metrics port), labelled by Triton model name."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from backends.lora.manager.metrics import TritonLoRAMetrics


class TritonDiffusionMetrics:
    def __init__(self, model_name: str):
        labels = {"model": model_name}
        kinds = pb_utils.MetricFamily
        self._families = [
            pb_utils.MetricFamily(name=n, description=d, kind=kinds.COUNTER) for n, d in (
                ("multilora_diffusion_images_total", "Images generated"),
                ("multilora_diffusion_batches_total", "Denoising batches run (each mixes any adapters)"),
                ("multilora_diffusion_batch_seconds_total", "Time spent denoising and encoding batches"),
            )
        ]
        self.images, self.batches, self.seconds = (f.Metric(labels=labels) for f in self._families)
        self.lora = TritonLoRAMetrics(model_name)

    def close(self) -> None:
        """Delete this model's series (see `TritonLoRAMetrics.close`)."""
        self.lora.close()
        self._families.clear()

"""The adapter as data: file names and errors (`files`, torch-free), the PEFT config (`config`, torch-free), PEFT
folders (`peft`) and diffusers/kohya files (`diffusers`) read and validated into one `LoRAAdapter`, and which
layers of a model take LoRA (`targets`)."""

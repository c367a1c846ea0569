"""LoRA core shared by the llm and diffusion models: PEFT adapter loading and validation (`adapter`), stable ids
(`ids`), name/path resolution (`registry`), the tiered LRU cache (`cache`), batched mixed-adapter math (`ops`) and
in-place patching of a model's linear layers (`patch`)."""

"""Serving adapters to one model: the request contract (`request`), selection of a request's adapters before it is
queued (`selector`), the tiered LRU cache of device slots and host copies (`cache`), the model's LoRA parameters
(`config`) and the LoRA metrics a model publishes (`metrics`)."""

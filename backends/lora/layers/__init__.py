"""LoRA-wrapped layers: linears (`linear`) and convolutions (`conv`) over one `LoRAContext` per model (`context`:
the slot buffers' contents and the ops backend); each layer's forward is its base output plus one ops call."""

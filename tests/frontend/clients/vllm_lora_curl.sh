#!/bin/bash
# vLLM's documented LoRA calls (docs "LoRA Adapters"): load an adapter at runtime, list it with its lineage, use it
# as the model of a completion, unload it. Each answer is printed on its own line.
set -euo pipefail
SERVER="${SERVER:-http://localhost:8000}"
: "${LORA_PATH:?set LORA_PATH to a LoRA folder on the server}"

curl -sf -X POST "$SERVER/v1/load_lora_adapter" -H "Content-Type: application/json" \
  -d "{\"lora_name\": \"sql_adapter\", \"lora_path\": \"$LORA_PATH\"}"
echo
curl -sf "$SERVER/v1/models"
echo
curl -sf "$SERVER/v1/completions" -H "Content-Type: application/json" -d '{
    "model": "sql_adapter",
    "prompt": "San Francisco is a",
    "max_tokens": 7,
    "temperature": 0
  }'
echo
curl -sf -X POST "$SERVER/v1/unload_lora_adapter" -H "Content-Type: application/json" \
  -d '{"lora_name": "sql_adapter"}'
echo

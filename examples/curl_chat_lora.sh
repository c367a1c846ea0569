#!/usr/bin/env bash
# Chat with a LoRA adapter through the OpenAI-compatible frontend, three ways:
#   1. model = adapter name (vLLM / lmdeploy style), 2. base model + "lora" object (vLLM-Omni style),
#   3. load an adapter at run time, use it, unload it (vLLM's /v1/load_lora_adapter; needs
#      --allow-runtime-lora-updating and, if set, the admin key).
# Env: BASE_URL (default http://127.0.0.1:9000), API_KEY, ADMIN_KEY, ADAPTERS (default .cache/adapters/demo).
set -euo pipefail
BASE_URL=${BASE_URL:-http://127.0.0.1:9000}
ADAPTERS=${ADAPTERS:-$(cd "$(dirname "$0")/.." && pwd)/.cache/adapters/demo}
auth=(-H "Authorization: Bearer ${API_KEY:-none}")
admin=(-H "Authorization: Bearer ${ADMIN_KEY:-${API_KEY:-none}}")
json=(-H "Content-Type: application/json")

echo "== model = adapter name"
curl -sf "${auth[@]}" "${json[@]}" "$BASE_URL/v1/chat/completions" -d '{
  "model": "uppercase", "max_tokens": 24, "temperature": 0,
  "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
echo

echo "== base model + lora object"
curl -sf "${auth[@]}" "${json[@]}" "$BASE_URL/v1/chat/completions" -d '{
  "model": "llm", "max_tokens": 32, "temperature": 0,
  "lora": {"name": "signature", "path": "'"$ADAPTERS/signature"'", "scale": 1.0},
  "messages": [{"role": "user", "content": "Say hello."}]}'
echo

echo "== load at run time, use, unload"
curl -sf "${admin[@]}" "${json[@]}" "$BASE_URL/v1/load_lora_adapter" \
  -d '{"lora_name": "example-upper", "lora_path": "'"$ADAPTERS/uppercase"'", "base_model_name": "llm"}'
echo
curl -sf "${auth[@]}" "${json[@]}" "$BASE_URL/v1/completions" \
  -d '{"model": "example-upper", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'
echo
curl -sf "${admin[@]}" "${json[@]}" "$BASE_URL/v1/unload_lora_adapter" -d '{"lora_name": "example-upper"}'
echo

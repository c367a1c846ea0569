#!/bin/bash
# Like vLLM-Omni's run_curl_lora_inference.sh: a chat completion with the adapter in `extra_body.lora`, no model.
set -euo pipefail
SERVER="${SERVER:-http://localhost:8091}"
PROMPT="${PROMPT:-A piece of cheesecake}"
LORA_NAME="${LORA_NAME:-my_lora}"
LORA_SCALE="${LORA_SCALE:-1.0}"
OUTPUT="${OUTPUT:-lora_output.png}"
: "${LORA_PATH:?set LORA_PATH to a LoRA folder on the server}"
SIZE="${SIZE:-1024}"
STEPS="${STEPS:-50}"
INT_ID=""
if [ -n "${LORA_INT_ID:-}" ]; then INT_ID=", \"int_id\": $LORA_INT_ID"; fi

curl -sf "$SERVER/v1/chat/completions" -H "Content-Type: application/json" -d "{
    \"messages\": [{\"role\": \"user\", \"content\": \"$PROMPT\"}],
    \"extra_body\": {
      \"height\": $SIZE, \"width\": $SIZE, \"num_inference_steps\": $STEPS, \"seed\": 42,
      \"lora\": {\"name\": \"$LORA_NAME\", \"local_path\": \"$LORA_PATH\", \"scale\": $LORA_SCALE$INT_ID}
    }
  }" | python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"][0]["image_url"]["url"])' \
  | sed 's/^data:image[^,]*,//' | base64 -d > "$OUTPUT"
echo "Image saved to: $OUTPUT"

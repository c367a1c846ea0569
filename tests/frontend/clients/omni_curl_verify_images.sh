#!/bin/bash
# Like vLLM-Omni's run_curl_lora_verify_images.sh: the same prompt and seed through /v1/images/generations without
# an adapter, then with `lora` at scale 0 and 1 (no model: the server's image model).
set -euo pipefail
SERVER="${SERVER:-http://localhost:8091}"
PROMPT="${PROMPT:-MIA_char, standing in a new york city}"
OUT_DIR="${OUT_DIR:-lora_verify_output}"
SIZE="${SIZE:-1024}"
STEPS="${STEPS:-50}"
: "${LORA_PATH:?set LORA_PATH to a LoRA folder on the server}"
mkdir -p "$OUT_DIR"

generate() {  # $1: output name, $2: extra JSON fields
  curl -sf "$SERVER/v1/images/generations" -H "Content-Type: application/json" -d "{
      \"prompt\": \"$PROMPT\", \"size\": \"${SIZE}x${SIZE}\", \"num_inference_steps\": $STEPS, \"seed\": 42,
      \"response_format\": \"b64_json\"$2
    }" | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["b64_json"])' | base64 -d > "$OUT_DIR/$1.png"
  echo "$OUT_DIR/$1.png"
}

generate baseline ""
for scale in 0 1; do
  generate "lora_scale_$scale" ", \"lora\": {\"name\": \"verify_lora\", \"local_path\": \"$LORA_PATH\", \"scale\": $scale}"
done

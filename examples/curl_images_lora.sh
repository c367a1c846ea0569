#!/usr/bin/env bash
# Generate an image with a diffusion LoRA (vLLM-Omni's run_curl_lora_inference.sh, on this server): the adapter is
# given per request as a "lora" object with a scale; the PNG is written to $OUT.
# Env: BASE_URL (default http://127.0.0.1:9000), API_KEY, LORA_PATH (default the tiny SD3 test adapter), OUT.
set -euo pipefail
BASE_URL=${BASE_URL:-http://127.0.0.1:9000}
LORA_PATH=${LORA_PATH:-$(cd "$(dirname "$0")/.." && pwd)/.cache/adapters/diffusion/tiny-sd3-a-diffusers}
OUT=${OUT:-lora_image.png}

curl -sf -H "Authorization: Bearer ${API_KEY:-none}" -H "Content-Type: application/json" \
  "$BASE_URL/v1/images/generations" -d '{
    "model": "diffusion", "prompt": "a watercolor lighthouse", "size": "64x64", "n": 1,
    "num_inference_steps": 4, "seed": 42,
    "lora": {"name": "style", "path": "'"$LORA_PATH"'", "scale": 0.8}}' \
  | python3 -c 'import base64, json, sys; open(sys.argv[1], "wb").write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))' "$OUT"
echo "wrote $OUT"

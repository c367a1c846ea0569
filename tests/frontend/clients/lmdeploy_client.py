#!/usr/bin/env python3
"""lmdeploy's LoRA client (docs "Serving LoRA"): the adapter registered at start (`--adapters mylora=...`) is
chosen by the `model` field of an openai SDK chat completion. Prints the response as JSON."""

import sys

from openai import OpenAI

client = OpenAI(api_key="YOUR_API_KEY", base_url=f"{sys.argv[1]}/v1")
model_name = "mylora"
response = client.chat.completions.create(
    model=model_name,
    messages=[
        {"role": "user", "content": "hi"},
    ],
    temperature=0.8,
    top_p=0.8,
)
print(response.model_dump_json())

"""vLLM's tokenizer routes: `/tokenize`, `/detokenize` and `/tokenizer_info` (see engine/tokenizers.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from openai_frontend.auth import require_api_key
from openai_frontend.errors import error_responses
from openai_frontend.schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter(dependencies=[Depends(require_api_key)], responses=error_responses(400, 401, 404, 503))


@router.post("/tokenize", responses=error_responses(413))
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    return await request.app.state.engine.tokenizers.tokenize(body)


@router.post("/detokenize", responses=error_responses(413))
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    return await request.app.state.engine.tokenizers.detokenize(body)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = None) -> dict:
    return await request.app.state.engine.tokenizers.info(model)

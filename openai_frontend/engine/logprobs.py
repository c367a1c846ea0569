"""OpenAI's logprobs objects from the backend's per-token log-probabilities: chat's `content` list and the
completions API's legacy object."""

from __future__ import annotations

from openai_frontend.engine.gateway import Logprobs


def _token_texts(tokenizer, entries: Logprobs) -> dict[int, str]:
    """Each distinct id's text, in one batched decode: thousands of single decodes would stall the event loop."""
    distinct = sorted({*entries.token_ids, *(i for row in entries.top for i, _ in row)})
    return dict(zip(distinct, tokenizer.batch_decode([[i] for i in distinct])))


def chat_logprobs(tokenizer, entries: Logprobs | None) -> dict:
    """OpenAI's chat logprobs object: per generated token its text, logprob, UTF-8 bytes and top alternatives."""
    if entries is None:
        return {"content": []}
    text_of = _token_texts(tokenizer, entries)

    def item(token_id: int, logprob: float) -> dict:
        text = text_of[token_id]
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]}
                        for t, lp, top in zip(entries.token_ids, entries.logprobs, entries.top)]}


def legacy_logprobs(tokenizer, entries: Logprobs | None) -> dict:
    """OpenAI's completions logprobs object: token strings, their logprobs, the top alternatives per position
    (the chosen token included, as vLLM does; None for a prompt's first token) and character offsets."""
    if entries is None:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text_of = _token_texts(tokenizer, entries)
    tokens = [text_of[t] for t in entries.token_ids]
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    top = []
    for token, logprob, alternatives in zip(tokens, entries.logprobs, entries.top):
        if logprob is None:
            top.append(None)
            continue
        row = {text_of[i]: v for i, v in alternatives}
        row.setdefault(token, logprob)
        top.append(row)
    return {"tokens": tokens, "token_logprobs": entries.logprobs, "top_logprobs": top, "text_offset": offsets}

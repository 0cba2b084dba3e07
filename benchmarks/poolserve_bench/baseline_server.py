"""The plain server a user would write: FastAPI + ``AutoModelForSequenceClassification``, padded.

    python -m poolserve_bench.baseline_server CHECKPOINT --port 8090

Written fairly: bf16 on the GPU, SDPA attention, the fast tokenizer, one padded batch per
request (a rerank request's 64 pairs are one forward), forwards serialised on one GPU by a lock
and run off the event loop. It speaks the same ``/rerank`` and ``/classify`` bodies as the
adapter (the fields the benchmark sends), so one load generator drives both.
"""

from __future__ import annotations

import argparse
import asyncio
import threading

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class RerankBody(BaseModel):
    query: str
    documents: list[str]


class ClassifyBody(BaseModel):
    input: list[str]


def create_app(checkpoint: str, score_template: str = "") -> FastAPI:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    gpu = threading.Lock()
    if score_template:
        forward = _llm_reranker_forward(checkpoint, score_template, tokenizer, device, dtype, gpu)
    else:
        # transformers' default attention: SDPA where the model supports it, eager otherwise (Gemma2).
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=dtype).to(device).eval()

        def forward(texts: list[str], pairs: list[str] | None) -> list[list[float]]:
            encoded = tokenizer(texts, pairs, padding=True, truncation=True, return_tensors="pt").to(device)
            with gpu, torch.inference_mode():
                logits = model(**encoded).logits.float()
            return (torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, -1)).cpu().tolist()

    app = FastAPI()

    @app.post("/rerank")
    async def rerank(body: RerankBody):
        scores = await asyncio.to_thread(forward, [body.query] * len(body.documents), body.documents)
        order = sorted(range(len(scores)), key=lambda i: scores[i][0], reverse=True)
        return {"results": [{"index": i, "relevance_score": scores[i][0]} for i in order]}

    @app.post("/classify")
    async def classify(body: ClassifyBody):
        probs = await asyncio.to_thread(forward, body.input, None)
        return {"data": [{"index": i, "probs": p} for i, p in enumerate(probs)]}

    @app.get("/health")
    async def health():
        return {}

    return app


def _llm_reranker_forward(checkpoint, score_template, tokenizer, device, dtype, gpu):
    """The official recipe of an LLM reranker: render each prompt, left-pad the batch, one causal-LM
    forward keeping only the last position's logits, then sigmoid of the label-token margin."""
    from transformers import AutoModelForCausalLM

    from poolserve_contract.score_templates import render, template_text
    from poolserve_runtime.families import read_config_dict
    from poolserve_runtime.llm_rerankers import FROM_2_WAY_SOFTMAX, conversion_for, token_ids

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    conversion = conversion_for(read_config_dict(checkpoint), checkpoint)
    ids = token_ids(tokenizer, conversion.tokens)
    template = template_text(score_template)
    tokenizer.padding_side = "left"

    def forward(texts: list[str], pairs: list[str] | None) -> list[list[float]]:
        prompts = [render(template, query, document) for query, document in zip(texts, pairs)]
        encoded = tokenizer(prompts, padding=True, return_tensors="pt").to(device)
        with gpu, torch.inference_mode():
            logits = model(**encoded, logits_to_keep=1).logits[:, -1].float()
        margin = logits[:, ids[1]] - logits[:, ids[0]] if conversion.method == FROM_2_WAY_SOFTMAX else logits[:, ids[0]]
        return torch.sigmoid(margin).unsqueeze(1).cpu().tolist()

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--score-template", default="", help="serve an LLM reranker with this score template")
    args = parser.parse_args()
    uvicorn.run(create_app(args.checkpoint, args.score_template), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

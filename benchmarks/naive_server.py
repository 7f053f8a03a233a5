"""The naive baseline for benchmarks/serve.py: FastAPI + transformers `generate`, one request at a
time (a lock around the model), greedy, no batching, no KV cache reuse across requests, no
constrained decoding. Answers the subset of /v1/chat/completions the benchmark sends, and
/v1/sentiment and /v1/ner with the service's prompt tokens (lingtune's TaskDecoder): sentiment is
one forward pass and the better of the two label tokens, NER greedy generation up to max_tokens.

Usage: python benchmarks/naive_server.py MODEL_DIR PORT [--adapter DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lingtune.decoding import TaskDecoder


class TaskRequest(BaseModel):
    text: str
    model: str | None = None
    max_tokens: int = 256


class ChatRequest(BaseModel):
    model: str
    messages: list[dict]
    max_tokens: int = 16
    temperature: float = 0.0
    extra_body: dict | None = None
    structured_outputs: dict | None = None  # sent by the benchmark; ignored here (free decoding)


def build_app(model_dir: str, adapter: str | None) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    end_ids = [tokenizer.eos_token_id] + [i for i in [tokenizer.convert_tokens_to_ids("<end_of_turn>")]
                                          if isinstance(i, int) and i != tokenizer.unk_token_id]
    lock = asyncio.Lock()
    app = FastAPI()
    decoder = TaskDecoder(tokenizer, max_tokens_ner=256)

    def answer_task(task: str, request: TaskRequest) -> tuple[dict, int, int]:
        ids = torch.tensor([decoder.prompt(task, request.text)["prompt_token_ids"]])
        with torch.inference_mode():
            step = decoder.label_steps.get(task)
            if step is not None:
                logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1]
                token = max(step.labels, key=lambda t: logits[t].item())
                return {"label": step.labels[token]}, ids.shape[1], 1
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.max_tokens,
                                 do_sample=False, eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:]
        return {"answer": tokenizer.decode(new, skip_special_tokens=True)}, ids.shape[1], len(new)

    async def task_route(task: str, request: TaskRequest):
        async with lock:
            result, prompt_tokens, completion_tokens = await asyncio.to_thread(answer_task, task, request)
        return {**result, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.post("/v1/sentiment")
    async def sentiment(request: TaskRequest):
        return await task_route("sentiment", request)

    @app.post("/v1/ner")
    async def ner(request: TaskRequest):
        return await task_route("ner", request)

    def generate(request: ChatRequest) -> tuple[str, int, int]:
        ids = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=request.max_tokens, do_sample=False, eos_token_id=end_ids,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        return tokenizer.decode(new, skip_special_tokens=True), ids["input_ids"].shape[1], len(new)

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest):
        async with lock:  # one at a time: the naive server
            text, prompt_tokens, completion_tokens = await asyncio.to_thread(generate, request)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": request.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.get("/health")
    async def health():
        return {}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("port", type=int)
    parser.add_argument("--adapter")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(build_app(args.model_dir, args.adapter), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

"""``POST /v1/completions``: ``prompt`` as text(s) or token ids, ``suffix`` (only for a model trained for
fill-in-the-middle, else a 400), ``echo``, ``logprobs``, ``best_of``, ``stream``. Prompts given as token ids
go through the input filters as the text they decode to."""

from __future__ import annotations

import time
import uuid

from chatforge.data.fim import insertion_ids, middle_params
from chatforge.errors import ChatforgeError
from chatforge.infer.outputs import TokenLogprob
from chatforge.infer.params import ParamError
from chatforge.serve.errors import APIError
from chatforge.serve.protocol import CompletionRequest
from chatforge.serve.serving import Call, EventStream, Serving, merge, token_text

MAX_PROMPTS = 128  # texts in one /v1/completions request


class CompletionServing(Serving):
    def prompts(self, body: CompletionRequest) -> list[str | list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif not prompt:
            raise APIError(400, "'prompt' must not be an empty list", param="prompt")
        elif isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request; got {len(prompts)}", param="prompt")
        prompts = [self.filtered_prompt(p) for p in prompts]
        if body.suffix is not None:
            if not self.card.fim:
                raise APIError(400, f"The model '{self.card.id}' was not trained for insertion (fill-in-the-middle), "
                                    "so 'suffix' is not supported. Send the prompt without a suffix, or serve a model "
                                    "trained with FIM.", param="suffix", code="suffix_not_supported")
            if not all(isinstance(p, str) for p in prompts):
                raise APIError(400, "'suffix' needs text prompts, not token ids", param="suffix")
        return prompts

    def filtered_prompt(self, prompt: str | list[int]) -> str | list[int]:
        """A prompt after the input filters; token ids are checked as the text they decode to (and sent as
        that text's tokens if a filter changed it)."""
        if isinstance(prompt, str) or self.filters is None:
            return self.filter_prompt(prompt, "prompt") if isinstance(prompt, str) else prompt
        try:
            self.engine.encode(prompt)  # ids outside the vocabulary are a 400 before they are decoded
        except ParamError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        text = self.tokenizer.decode(prompt)
        filtered = self.filter_prompt(text, "prompt")
        return prompt if filtered == text else filtered

    def prompt_ids(self, body: CompletionRequest, prompt: str | list[int], requested: int | None) -> list[int]:
        if body.suffix is not None:
            return insertion_ids(self.tokenizer, prompt, body.suffix)
        try:
            ids = self.engine.encode(prompt)
        except ChatforgeError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        if body.truncate:
            ids = ids[-(self.engine.block_size - self.reserved_tokens(requested)):]
        return ids

    async def create(self, body: CompletionRequest, call: Call):
        self.check_model(body.model, "chat")
        if body.stream and body.best_of is not None and body.best_of > (body.n or 1):
            raise APIError(400, "'best_of' cannot be used with 'stream' (the best answers are known only at the end)",
                           param="best_of")
        if body.stream and self.filters is not None:
            raise APIError(400, "this server filters answers: stream chat completions, or ask for the whole text "
                                "completion (stream=false)", param="stream")
        self.check_logprobs_allowed(body.logprobs is not None, "logprobs")
        self.check_requested(body.max_tokens, "max_tokens")
        prompts = self.prompts(body)
        all_ids = [self.prompt_ids(body, p, body.max_tokens) for p in prompts]
        max_tokens = [self.resolve_max_tokens(body.max_tokens, len(ids), "max_tokens", "prompt") for ids in all_ids]
        echo = bool(body.echo)
        params = [self.sampling(body, m, body.logprobs, echo=echo and body.logprobs is not None, best_of=body.best_of)
                  for m in max_tokens]
        if body.suffix is not None:
            params = [middle_params(self.tokenizer, p) for p in params]
        handles = self.submit_all(call.limit_key, all_ids, params)
        rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params[0].n
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self.chunks(handles, all_ids, rid, created, n, echo, body.logprobs, include_usage)
            return EventStream(self.sse(chunks, call), handles)
        completions = await self.collect(handles, call)
        choices = []
        for p, completion in enumerate(completions):
            prompt_text = self.tokenizer.decode(completion.prompt_ids) if echo else ""
            for c in completion.choices:
                logprobs = None
                if body.logprobs is not None:
                    pairs = list(zip(completion.prompt_ids, completion.prompt_logprobs)) if echo else []
                    logprobs, _ = self.logprobs(pairs + [(e.token_id, e) for e in c.logprobs], 0)
                guards = self.output_guards(1)
                text, finish = self.filtered_choice(guards[0] if guards else None, c.text, c.finish_reason)
                choices.append({"text": prompt_text + text, "index": p * n + c.index, "logprobs": logprobs,
                                "finish_reason": finish})
        return {"id": rid, "object": "text_completion", "created": created, "model": self.card.id,
                "choices": choices, "usage": self.usage(completions)}

    async def chunks(self, handles, all_ids, rid, created, n, echo, logprobs, include_usage):
        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": self.card.id,
                    "choices": choices, **extra}

        offsets: dict[int, int] = {}
        if echo:
            for p, ids in enumerate(all_ids):
                text = self.tokenizer.decode(ids)
                for i in range(n):
                    lp = None
                    if logprobs is not None:  # prompt log-probs are computed with the prefill, not streamed
                        lp, offsets[p * n + i] = self.logprobs([(t, None) for t in ids], 0)
                    else:
                        offsets[p * n + i] = len(text)
                    yield chunk([{"text": text, "index": p * n + i, "logprobs": lp, "finish_reason": None}])
        async for p, delta in merge(handles):
            index = p * n + delta.index
            lp = None
            if delta.logprobs is not None:
                lp, offsets[index] = self.logprobs([(e.token_id, e) for e in delta.logprobs], offsets.get(index, 0))
            if delta.text or delta.finish_reason or (lp and lp["tokens"]):
                yield chunk([{"text": delta.text, "index": index, "logprobs": lp,
                              "finish_reason": delta.finish_reason}])
        if include_usage:
            yield chunk([], usage=self.usage([h.completion for h in handles]))

    def logprobs(self, entries: list[tuple[int, TokenLogprob | None]], offset: int) -> tuple[dict, int]:
        """OpenAI's completions logprobs ({tokens, token_logprobs, top_logprobs, text_offset}) of
        (token id, entry) pairs, the first at character ``offset``; also returns the offset after them."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in entries:
            if token_id in self.hidden_ids:
                continue
            text, _ = token_text(self.tokenizer, token_id)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            out["token_logprobs"].append(entry.logprob if entry else None)
            top = None
            if entry is not None:
                top = {token_text(self.tokenizer, t)[0]: lp for t, lp in entry.top}
            out["top_logprobs"].append(top)
            offset += len(text)
        return out, offset

"""``POST /v1/edits`` (the legacy edit shape, rendered with the edit template that ``chatforge edit-train``
trains on) and ``POST /v1/moderations`` (OpenAI's shape over the content filters). Edits go through the
same input and output filters as chat."""

from __future__ import annotations

import time
import uuid

from chatforge.chat_template import edit_messages, prompt_ids, stop_token_ids
from chatforge.safety.filters import FilterPipeline
from chatforge.serve.errors import APIError
from chatforge.serve.protocol import EditRequest, ModerationRequest
from chatforge.serve.serving import Call, ServerState, Serving


class EditServing(Serving):
    def __init__(self, state: ServerState, chat_ready: bool):
        super().__init__(state)
        self.chat_ready = chat_ready

    async def create(self, body: EditRequest, call: Call):
        self.check_model(body.model, "chat")
        if body.stream:
            raise APIError(400, "/v1/edits does not stream; use /v1/chat/completions for a streamed edit",
                           param="stream")
        if not self.chat_ready:
            raise APIError(400, f"The model '{self.card.id}' has no chat-template tokens, so it cannot edit.",
                           param="model")
        if not body.instruction.strip():
            raise APIError(400, "'instruction' must say how to edit the input", param="instruction")
        instruction = self.filter_prompt(body.instruction, "instruction")
        text = self.filter_prompt(body.input, "input")
        ids = prompt_ids(edit_messages(instruction, text), self.tokenizer)
        max_tokens = self.resolve_max_tokens(body.max_tokens, len(ids), "max_tokens", "input")
        params = self.sampling(body, max_tokens, None, stop_token_ids(self.tokenizer))
        (completion,) = await self.collect(self.submit_all(call.limit_key, [ids], [params]), call)
        guards = self.output_guards(len(completion.choices))
        choices = []
        for c in completion.choices:
            text, finish = self.filtered_choice(guards[c.index] if guards else None, c.text, c.finish_reason)
            choices.append({"index": c.index, "text": text, "finish_reason": finish})
        return {"object": "edit", "created": int(time.time()), "model": self.card.id, "choices": choices,
                "usage": self.usage([completion])}


class ModerationServing(Serving):
    def __init__(self, state: ServerState):
        super().__init__(state)
        self.moderation = self.filters or FilterPipeline()

    def create(self, body: ModerationRequest) -> dict:
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise APIError(400, "'input' must not be an empty list", param="input")
        results = []
        for text in texts:
            scores = self.moderation.scores(text)
            threshold = self.moderation.policy.classifier_threshold
            flags = {name: score >= (threshold if name == "classifier" else 1.0) for name, score in scores.items()}
            results.append({"flagged": any(flags.values()), "categories": flags,
                            "category_scores": {k: round(v, 4) for k, v in scores.items()}})
        return {"id": f"modr-{uuid.uuid4().hex}", "model": "chatforge-filters", "results": results}

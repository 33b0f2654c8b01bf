"""The routes the web page calls to keep its conversations and feedback (``/feedback/...``).

They take the same Bearer key as the OpenAI routes; with keys on, each key sees only its own conversations.
"""

from __future__ import annotations

from typing import Callable, Literal

from fastapi import APIRouter, Depends
from pydantic import Field

from chatforge.errors import ChatforgeError
from chatforge.serve.errors import APIError
from chatforge.serve.feedback import CLIENT_SIGNALS, FeedbackStore, NotFound
from chatforge.serve.schemas import Strict


class NewConversation(Strict):
    title: str = ""


class Rename(Strict):
    title: str


class NewMessage(Strict):
    conversation_id: str
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    parent_id: str | None = None
    model: str | None = None
    finish_reason: str | None = Field(None, max_length=32)
    compare_group: str | None = Field(None, max_length=32)
    compare_index: int | None = Field(None, ge=0)


class EditBody(Strict):
    content: str


class RatingBody(Strict):
    value: Literal[-1, 0, 1]


class SignalBody(Strict):
    kind: Literal[CLIENT_SIGNALS]  # type: ignore[valid-type]


class RankingBody(Strict):
    message_ids: list[str] = Field(min_length=2)
    ranking: list[int] = Field(description="indices into message_ids, best first")


def feedback_router(store: FeedbackStore, model_id: str, client: Callable) -> APIRouter:
    """Routes over ``store``; ``client`` is the dependency that authenticates and names the caller."""
    router = APIRouter(prefix="/feedback", tags=["feedback"])

    def call(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NotFound as exc:
            raise APIError(404, str(exc), code="not_found") from None
        except ChatforgeError as exc:
            raise APIError(400, str(exc)) from None

    # plain `def` routes: FastAPI runs them in its thread pool, so database calls never block the event loop
    @router.get("/conversations")
    def list_conversations(who: str = Depends(client)):
        return {"data": store.list_conversations(who)}

    @router.post("/conversations")
    def create_conversation(body: NewConversation, who: str = Depends(client)):
        return store.create_conversation(model_id, who, body.title)

    @router.get("/conversations/{conversation_id}")
    def get_conversation(conversation_id: str, who: str = Depends(client)):
        return call(store.get_conversation, conversation_id, who)

    @router.patch("/conversations/{conversation_id}")
    def rename_conversation(conversation_id: str, body: Rename, who: str = Depends(client)):
        return call(store.rename_conversation, conversation_id, body.title, who)

    @router.delete("/conversations/{conversation_id}")
    def delete_conversation(conversation_id: str, who: str = Depends(client)):
        call(store.delete_conversation, conversation_id, who)
        return {"deleted": conversation_id}

    @router.post("/messages")
    def add_message(body: NewMessage, who: str = Depends(client)):
        return call(store.add_message, body.conversation_id, body.role, body.content, body.parent_id,
                    body.model or model_id, body.finish_reason, body.compare_group, body.compare_index, who)

    @router.post("/messages/{message_id}/edit")
    def edit_message(message_id: str, body: EditBody, who: str = Depends(client)):
        return call(store.edit_message, message_id, body.content, who)

    @router.post("/messages/{message_id}/rating")
    def rate(message_id: str, body: RatingBody, who: str = Depends(client)):
        return call(store.rate, message_id, body.value, who)

    @router.post("/messages/{message_id}/signal")
    def signal(message_id: str, body: SignalBody, who: str = Depends(client)):
        call(store.add_signal, message_id, body.kind, who)
        return {"recorded": body.kind}

    @router.post("/rankings")
    def add_ranking(body: RankingBody, who: str = Depends(client)):
        return call(store.add_ranking, body.message_ids, body.ranking, who)

    return router

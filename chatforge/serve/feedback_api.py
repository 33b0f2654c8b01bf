"""The routes the web page calls to keep its conversations and feedback (``/feedback/...``).

They take the same Bearer key as the OpenAI routes; with keys on, each key sees only its own conversations,
without keys each browser (its client id cookie). Answers are stored by reference to the chat completion
that produced them (the server fills in their text and model); a person can rate, rank, copy and edit them,
or write an answer of their own, which is stored as human-written. Writes count against the client's
``feedback_writes_per_minute``.
"""

from __future__ import annotations

from typing import Callable

from fastapi import APIRouter, Depends, Request

from chatforge.errors import ChatforgeError
from chatforge.serve.chat import prompt_digest
from chatforge.serve.errors import APIError
from chatforge.serve.feedback import FeedbackStore, NotFound
from chatforge.serve.protocol import (
    ConversationList,
    ConversationSummary,
    Deleted,
    EditBody,
    NewConversation,
    NewMessage,
    RankingBody,
    RatingBody,
    Recorded,
    Rename,
    SignalBody,
    StoredConversation,
    StoredMessage,
    StoredRanking,
    documented,
)
from chatforge.serve.security import RateLimiter
from chatforge.serve.serving import ServerState

RECORDING_WAIT = 10.0  # seconds an answer's reference may wait for the stream that produced it to be recorded


def feedback_router(store: FeedbackStore, state: ServerState, client: Callable, limit_key: Callable) -> APIRouter:
    """Routes over ``store``; ``client`` is the dependency that authenticates and names the caller,
    ``limit_key(request, who)`` names whose write quota a request spends."""
    router = APIRouter(prefix="/feedback", tags=["feedback"])
    quota = RateLimiter(state.options.feedback_writes_per_minute, unit="feedback writes")

    def writer(request: Request, who: str = Depends(client)) -> str:
        quota.take(limit_key(request, who))
        return who

    def call(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NotFound as exc:
            raise APIError(404, str(exc), code="not_found") from None
        except ChatforgeError as exc:
            raise APIError(400, str(exc)) from None

    # plain `def` routes: FastAPI runs them in its thread pool, so database calls never block the event loop
    @router.get("/conversations", responses=documented(ConversationList))
    def list_conversations(who: str = Depends(client)):
        return {"data": store.list_conversations(who)}

    @router.post("/conversations", responses=documented(ConversationSummary))
    def create_conversation(body: NewConversation, who: str = Depends(writer)):
        return store.create_conversation(state.card.id, who, body.title)

    @router.get("/conversations/{conversation_id}", responses=documented(StoredConversation))
    def get_conversation(conversation_id: str, who: str = Depends(client)):
        return call(store.get_conversation, conversation_id, who)

    @router.patch("/conversations/{conversation_id}", responses=documented(ConversationSummary))
    def rename_conversation(conversation_id: str, body: Rename, who: str = Depends(writer)):
        return call(store.rename_conversation, conversation_id, body.title, who)

    @router.delete("/conversations/{conversation_id}", responses=documented(Deleted))
    def delete_conversation(conversation_id: str, who: str = Depends(writer)):
        call(store.delete_conversation, conversation_id, who)
        return {"deleted": conversation_id}

    @router.post("/messages", responses=documented(StoredMessage))
    def add_message(body: NewMessage, who: str = Depends(writer)):
        if body.completion_id is not None:
            if body.role != "assistant" or body.content is not None or body.parent_id is None:
                raise APIError(400, "an answer given by completion_id is an assistant message under its question, "
                                    "without content (the server has its text)", param="completion_id")
            recording = state.recording.get(body.completion_id)
            if recording is not None:  # the stream that produced it is still being stored
                recording.wait(RECORDING_WAIT)
            return call(store.add_generated_answer, body.conversation_id, body.completion_id, body.choice_index,
                        body.parent_id, prompt_digest, body.compare_group, body.compare_index, who)
        if body.content is None:
            raise APIError(400, "a message needs 'content' (or, for an answer the server generated, "
                                "'completion_id')", param="content")
        if body.compare_group is not None:
            raise APIError(400, "only generated answers (by completion_id) can be compared", param="compare_group")
        return call(store.add_message, body.conversation_id, body.role, body.content, body.parent_id,
                    user_id=who, author="human")

    @router.post("/messages/{message_id}/edit", responses=documented(StoredMessage))
    def edit_message(message_id: str, body: EditBody, who: str = Depends(writer)):
        return call(store.edit_message, message_id, body.content, who)

    @router.post("/messages/{message_id}/rating", responses=documented(StoredMessage))
    def rate(message_id: str, body: RatingBody, who: str = Depends(writer)):
        return call(store.rate, message_id, body.value, who)

    @router.post("/messages/{message_id}/signal", responses=documented(Recorded))
    def signal(message_id: str, body: SignalBody, who: str = Depends(writer)):
        call(store.add_signal, message_id, body.kind, who)
        return {"recorded": body.kind}

    @router.post("/rankings", responses=documented(StoredRanking))
    def add_ranking(body: RankingBody, who: str = Depends(writer)):
        return call(store.add_ranking, body.message_ids, body.ranking, who)

    return router

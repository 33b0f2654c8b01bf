"""The OpenAI-compatible HTTP API over one engine's continuous-batching scheduler: the routes, each handed to
its endpoint family (``chat``, ``completions``, ``embeddings``, ``edits``), and the app's middleware.

    app = create_app(Scheduler(engine), ServeOptions(model_name="chatforge-sft"), store=FeedbackStore(url))

Endpoints (``/openapi.json`` describes them all, with their bodies in ``chatforge.serve.protocol``):

* ``GET /v1/models``, ``GET /v1/models/{id}`` — the served model(s); each card also says ``context_length``,
  ``kind`` (chat or embedding) and ``fim`` (whether ``suffix`` insertion is available).
* ``POST /v1/chat/completions`` — prompts are rendered by THE chat template (``chatforge.chat_template``);
  ``stream``, ``n``, ``stop``, ``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``,
  presence/frequency penalties, ``logit_bias``, ``seed``, ``logprobs``/``top_logprobs``, ``user``; ``tools``
  (functions the client runs: the answer ends in ``tool_calls``) and ``tool_choice`` (none/auto); with
  ``--tools`` the server also runs built-in tools (calculator, retrieval) inside the answer.
* ``POST /v1/completions`` — ``prompt`` as text(s) or token ids, ``suffix`` (only for a model trained for
  fill-in-the-middle, else a 400), ``echo``, ``logprobs``, ``best_of``, ``stream``.
* ``POST /v1/moderations`` — OpenAI's shape: per input, ``flagged``, ``categories`` and ``category_scores``
  of the content filters (the ``--safety_policy`` categories, PII, and its classifier if any). With a
  policy, every prompt (chat, text, token ids, edits) goes through the filters before generation (a
  refusal is a 400 with code ``content_filter``) and every answer (and tool result) before it is shown (a
  tripped filter cuts a streamed answer: ``finish_reason: "content_filter"``); log-probabilities are not
  offered; every decision is logged to the feedback store.
* ``POST /v1/edits`` — the legacy edit shape (``input``, ``instruction``), rendered with the edit template that
  ``chatforge edit-train`` trains on; serve an edit model for useful answers.
* ``POST /v1/embeddings`` — when an embedding model was loaded; otherwise a 400 saying so.
* ``GET /health`` — scheduler occupancy; ``GET /`` — the web chat page; ``/feedback/...`` — its store.

Every generation request is submitted to the shared ``Scheduler``, so concurrent requests decode together;
one request's bad value fails that request alone. A request is admitted by what it costs: its sequences
(n x prompts) against ``max_waiting``, its tokens against the client's ``token_rate_limit``, and the
client's running requests against ``max_concurrent``. Streams are server-sent events ending in ``data:
[DONE]``. A client that disconnects (mid-stream, while waiting for a whole answer, or during tool calls) has
its request cancelled, as has one past ``request_timeout``. Bad input of any kind is a 4xx in OpenAI's error
shape (see ``chatforge.serve.errors``).

Without API keys the server is for this machine: it answers only to localhost Host names (unless
``allowed_hosts`` says otherwise) and keeps each browser's conversations apart by a random cookie.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles

from chatforge.infer.scheduler import Scheduler
from chatforge.serve import errors
from chatforge.serve.chat import ChatServing
from chatforge.serve.completions import CompletionServing
from chatforge.serve.edits import EditServing, ModerationServing
from chatforge.serve.embeddings import EmbeddingServing
from chatforge.serve.feedback_api import feedback_router
from chatforge.serve.options import ModelCard, ServeOptions
from chatforge.serve.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    EditRequest,
    EditResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    Health,
    ModelList,
    ModelObject,
    ModerationRequest,
    ModerationResponse,
    TextCompletion,
    documented,
)
from chatforge.serve.security import LOCAL_HOSTS, BodySizeLimit, KeyChecker, LocalGuard, RateLimiter
from chatforge.serve.serving import Call, EventStream, ServerState

__all__ = ["ServeOptions", "ModelCard", "create_app"]
STATIC_DIR = Path(__file__).parent / "static"


def create_app(scheduler: Scheduler, options: ServeOptions | None = None, store=None, embedder=None,
               card: ModelCard | None = None) -> FastAPI:
    """The FastAPI app: OpenAI routes over ``scheduler``, the feedback routes over ``store`` (if given), the web
    page. Several apps may share one scheduler (one engine, one batch)."""
    options = options or ServeOptions()
    options.validate()
    embed_card = ModelCard(embedder.name, embedder.spec_.max_tokens, kind="embedding") if embedder else None
    state = ServerState(scheduler, options, card, embed_card, store)
    chat = ChatServing(state)
    completion = CompletionServing(state)
    edit = EditServing(state, chat.chat_ready)
    moderation = ModerationServing(state)
    embedding = EmbeddingServing(state, embedder)
    keys = KeyChecker(options.keys())
    limiter = RateLimiter(options.rate_limit)
    app = FastAPI(title="chatforge", version="1", docs_url=None, redoc_url=None,  # docs pages need a CDN
                  description="OpenAI-compatible API of a chatforge model, and the feedback store of its web page.")
    app.state.serving = state
    app.state.options = options
    app.state.store = store
    errors.install(app)
    bearer = HTTPBearer(auto_error=False, description="an API key, when the server was started with some")

    def client(request: Request, _=Depends(bearer)) -> str:
        """The caller's id: its API key's, or without keys its browser's (cookie)."""
        return keys.check(request.headers.get("authorization")) or request.scope["state"].get("client_id", "")

    def limit_key(request: Request, who: str) -> str:
        """Whose budget a request spends: its key's, or without keys its address's."""
        return who if keys.enabled else f"ip-{request.client.host if request.client else ''}"

    def limited(request: Request, who: str = Depends(client)) -> Call:
        key = limit_key(request, who)
        limiter.take(key)
        return Call(request, who, key, time.monotonic() + options.request_timeout)

    async def running(call: Call, handle):
        """``handle()``'s answer while the client's concurrency slot is held (a stream holds it until it ends)."""
        release = state.running.acquire(call.limit_key)
        try:
            answer = await handle()
        except BaseException:
            release()
            raise
        if isinstance(answer, EventStream):
            answer.on_close.append(release)
        else:
            release()
        return answer

    @app.get("/v1/models", tags=["openai"], responses=documented(ModelList))
    async def list_models(_: str = Depends(client)):
        return {"object": "list", "data": [c.to_json() for c in state.cards()]}

    @app.get("/v1/models/{model_id}", tags=["openai"], responses=documented(ModelObject))
    async def get_model(model_id: str, _: str = Depends(client)):
        for c in state.cards():
            if c.id == model_id:
                return c.to_json()
        raise errors.APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")

    @app.post("/v1/chat/completions", tags=["openai"], responses=documented(ChatCompletion, stream=True))
    async def chat_completions(body: ChatCompletionRequest, call: Call = Depends(limited)):
        return await running(call, lambda: chat.create(body, call))

    @app.post("/v1/completions", tags=["openai"], responses=documented(TextCompletion, stream=True))
    async def completions(body: CompletionRequest, call: Call = Depends(limited)):
        return await running(call, lambda: completion.create(body, call))

    @app.post("/v1/moderations", tags=["openai"], responses=documented(ModerationResponse))
    async def moderations(body: ModerationRequest, _: Call = Depends(limited)):
        return moderation.create(body)

    @app.post("/v1/edits", tags=["openai"], responses=documented(EditResponse))
    async def edits(body: EditRequest, call: Call = Depends(limited)):
        return await running(call, lambda: edit.create(body, call))

    @app.post("/v1/embeddings", tags=["openai"], responses=documented(EmbeddingResponse))
    async def embeddings(body: EmbeddingRequest, call: Call = Depends(limited)):
        return await running(call, lambda: embedding.create(body))

    @app.get("/health", tags=["server"], responses=documented(Health))
    async def health():
        return {"status": "ok", "model": state.card.id, **scheduler.stats()}

    @app.get("/ui/config", tags=["web page"])
    async def ui_config():
        return {"model": state.card.id, "context_length": state.engine.block_size, "compare_k": options.compare_k,
                "max_tokens": chat.token_limit, "auth": keys.enabled, "feedback": store is not None}

    if store is not None:
        app.include_router(feedback_router(store, state, client, limit_key))

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodySizeLimit, max_bytes=options.max_request_bytes, timeout=options.body_timeout)
    hosts = options.allowed_hosts or (["*"] if keys.enabled else list(LOCAL_HOSTS))
    app.add_middleware(LocalGuard, allowed_hosts=hosts, cookies=not keys.enabled)
    app.add_middleware(errors.InternalErrors)  # outermost of ours: catches the others' failures too
    return app

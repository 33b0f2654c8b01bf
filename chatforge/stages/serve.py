"""serve a model: OpenAI-compatible API, web chat page with feedback, store that feeds training.

    chatforge serve                                   # runs/speedrun/sft on http://127.0.0.1:8000/
    chatforge serve --ckpt=runs/speedrun/rlhf --host=0.0.0.0 --port=8080 --api_keys_file=keys.txt --rate_limit=60
    chatforge serve --embed_ckpt=runs/speedrun/embed  # also answers /v1/embeddings

Any OpenAI client works against ``http://HOST:PORT/v1`` with ``model`` set to the served id (``GET
/v1/models``); the API is described at ``/openapi.json``. The web page at ``/`` streams answers and
records conversations, thumbs up/down, edits, rankings of compare mode and implicit signals in the feedback
store (``RUN_DIR/feedback.db``, SQLite in WAL mode, or ``--db=postgresql+psycopg://...``). Turn them into
training data with ``chatforge feedback export --as sft|rankings``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chatforge.config import nested, option
from chatforge.device import resolve_device
from chatforge.embed.model import ChatforgeEmbedder
from chatforge.errors import ChatforgeError
from chatforge.infer.loading import checkpoint_engine
from chatforge.infer.precision import InferenceOptions
from chatforge.infer.scheduler import Scheduler
from chatforge.model.checkpoint import trained_for_fim
from chatforge.serve.api import ServeOptions, create_app
from chatforge.serve.feedback import FeedbackStore, store_target
from chatforge.serve.server import check_listen, serve_forever


@dataclass
class Config(ServeOptions):
    ckpt: str = option("runs/speedrun/sft", "checkpoint directory, run directory or Hugging Face GPT-2 directory")
    tokenizer: str = option("", "tokenizer.json or its directory (default: the checkpoint's tokenizer)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    max_batch_size: int = option(16, "KV-cache slots: sequences decoded together across all requests")
    inference: InferenceOptions = nested(InferenceOptions, "how decoding computes (dtype, quantize, compile)")
    embed_ckpt: str = option("", "embedding model (saved by `chatforge embed`) to serve on /v1/embeddings")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = option(8000, "port to listen on")
    insecure: bool = option(False, "allow a non-loopback --host without API keys (a network that is yours alone)")
    run_dir: str = option("runs/serve", "folder of the feedback database")
    db: str = option("", "feedback database: a SQLAlchemy URL or a SQLite file (default: RUN_DIR/feedback.db)")
    log_level: str = option("info", "uvicorn log level")
    threads: int = option(0, "torch intra-op threads (0 = torch's default); on a small CPU machine shared with "
                             "the clients, 1 keeps OpenMP barriers from stalling on a busy core")


def run(cfg: Config, args: list[str]) -> None:
    if args:
        raise ChatforgeError(f"unexpected argument(s): {' '.join(args)}")
    check_listen(cfg.host, cfg.port, bool(cfg.keys()), cfg.insecure)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    engine = checkpoint_engine(cfg.ckpt, cfg.device, cfg.inference, tokenizer=cfg.tokenizer,
                               max_batch_size=cfg.max_batch_size)
    cfg.model_name = cfg.model_name or Path(cfg.ckpt).resolve().name
    cfg.fim = cfg.fim or trained_for_fim(cfg.ckpt)
    embedder = None
    if cfg.embed_ckpt:
        embedder = ChatforgeEmbedder.load(cfg.embed_ckpt, device=str(resolve_device(cfg.device)))
    store = FeedbackStore(store_target(cfg.run_dir, cfg.db))
    scheduler = Scheduler(engine)
    app = create_app(scheduler, cfg, store=store, embedder=embedder)
    keys = "on" if cfg.keys() else "off (anyone who can reach the port may use it)"
    print(f"serving '{cfg.model_name}' ({cfg.ckpt}, context {engine.block_size}, {cfg.max_batch_size} slots) on "
          f"http://{cfg.host}:{cfg.port}/  — API at /v1, spec at /openapi.json, API keys {keys}; "
          f"feedback in {store._safe_url()}", flush=True)
    try:
        serve_forever(app, cfg.host, cfg.port, cfg.log_level)
    finally:
        scheduler.close()
        store.close()

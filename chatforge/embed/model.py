"""A GPT turned into a text/code embedding model, as in "Text and Code Embeddings by Contrastive Pre-Training"
(Neelakantan et al., 2022): the embedding of a text is the GPT's final hidden state at an end token appended
to it, L2-normalised (mean pooling over the text's tokens is an option), optionally through a linear
projection head. Training is symmetric InfoNCE over in-batch negatives with a learnable, clamped temperature;
gradient caching makes large contrastive batches fit in little memory.

Two kinds of model:

* ``similarity`` (symmetric): both sides are encoded the same way, ``<|endoftext|> text <|endoftext|>``;
  similar texts get similar vectors ("I like apples" ~ "I hate apples": same topic).
* ``search`` (asymmetric): a query is ``<|endoftext|> query: text <|endoftext|>`` and a document
  ``<|endoftext|> document: text <|endoftext|>``. Relevance is not similarity (a document answering
  "I like apples" need not resemble it), so the two sides must be distinguishable to the model. The markers
  are plain text rather than special tokens: every tokenizer can encode them (an imported GPT-2 has no chat
  specials) and the pretrained model already knows the words, so training starts from a meaningful signal.

The leading ``<|endoftext|>`` puts every text at a document boundary, as pretraining saw documents; the
trailing one is the only position whose causal attention covers the whole text, hence the embedding.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from chatforge import io
from chatforge.config import from_dict as config_from_dict
from chatforge.config import option
from chatforge.embed.base import token_windows
from chatforge.errors import ChatforgeError
from chatforge.io import atomic_directory
from chatforge.model.checkpoint import read_safetensors, recorded_gpt_config
from chatforge.model.gpt import GPT
from chatforge.model.heads import freeze_output_layer
from chatforge.tokenizer import END_OF_TEXT, Tokenizer

END_TOKEN = END_OF_TEXT
KINDS = ("similarity", "search")
POOLINGS = ("last", "mean")
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1.0
EMBEDDER_FILE, WEIGHTS_FILE, EMBEDDER_FORMAT = "embedder.json", "embedder.safetensors", 1


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class EmbedSpec:
    """How texts become vectors; saved with the model so an index encodes queries as training did."""

    kind: str = option("search", "similarity (symmetric, text<->text) or search (distinct query/document markers)")
    pooling: str = option("last", "last = hidden state at the appended end token (CPT); mean = mean over tokens")
    query_marker: str = option("query: ", "text put before a query (search models only)")
    document_marker: str = option("document: ", "text put before a document (search models only)")
    max_tokens: int = option(128, "texts are truncated to this many tokens, markers included")
    proj_dim: int = option(0, "size of a linear projection head on top of the pooled state (0 = no head)")

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ChatforgeError(f"embedding.kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.pooling not in POOLINGS:
            raise ChatforgeError(f"embedding.pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}")
        for name in ("query_marker", "document_marker"):
            if not isinstance(getattr(self, name), str):
                raise ChatforgeError(f"embedding.{name} must be a string, got {getattr(self, name)!r}")
        if self.kind == "search" and self.query_marker == self.document_marker:
            raise ChatforgeError("a search model needs different embedding.query_marker and embedding.document_marker")
        if self.max_tokens < 4:
            raise ChatforgeError(f"embedding.max_tokens must be >= 4, got {self.max_tokens}")
        if self.proj_dim < 0:
            raise ChatforgeError(f"embedding.proj_dim must be >= 0, got {self.proj_dim}")

    def marker(self, role: str) -> str:
        if role not in ("query", "document"):
            raise ChatforgeError(f"role must be 'query' or 'document', got {role!r}")
        if self.kind == "similarity":
            return ""
        return self.query_marker if role == "query" else self.document_marker

    def to_dict(self) -> dict:
        return asdict(self)


def framing(tokenizer, role: str, spec: EmbedSpec, block_size: int) -> tuple[list[int], int]:
    """The tokens put before a ``role``'s text (end token, marker) and how many of the text's tokens fit after
    them; a marker that leaves no room is an error."""
    end = tokenizer.special_id(END_TOKEN)
    marker = spec.marker(role)
    prefix = [end] + (tokenizer.encode(marker) if marker else [])
    budget = min(spec.max_tokens, block_size) - len(prefix) - 1
    if budget < 1:
        raise ChatforgeError(
            f"the {role} marker {marker!r} leaves no room for text in {min(spec.max_tokens, block_size)} tokens"
        )
    return prefix, budget


def encode_texts(
    tokenizer, texts: Sequence[str], role: str, spec: EmbedSpec, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] (right-padded) and lengths [B] of ``texts`` framed for ``role``.

    Right padding needs no attention mask: attention is causal, so a text's tokens never see the padding.
    """
    end = tokenizer.special_id(END_TOKEN)
    prefix, budget = framing(tokenizer, role, spec, block_size)
    rows = [prefix + ids[:budget] + [end] for ids in tokenizer.encode_batch(list(texts))]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), end, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, lengths


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, C] hidden states -> [B, C]: the last real position, or the mean over real positions."""
    lengths = lengths.to(hidden.device)
    if pooling == "last":
        return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]
    mask = (torch.arange(hidden.size(1), device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
    return (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)


class EmbeddingModel(nn.Module):
    """GPT + pooling + optional projection + the contrastive temperature."""

    def __init__(self, gpt: GPT, pooling: str = "last", proj_dim: int = 0, temperature: float = 0.05):
        super().__init__()
        self.gpt = gpt
        freeze_output_layer(gpt)
        self.pooling = pooling
        self.proj = nn.Linear(gpt.config.n_embd, proj_dim, bias=False) if proj_dim else None
        # learned as a log so it stays positive; clamped in ``scale`` so it cannot collapse or explode. One element
        # rather than 0-d: FSDP shards parameters along their first dimension and refuses a 0-d one
        self.log_inv_temperature = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "log_inv_temperature"
        if key in state_dict and state_dict[key].dim() == 0:  # saved when the temperature was 0-d
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def dim(self) -> int:
        return self.proj.out_features if self.proj is not None else self.gpt.config.n_embd

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, with_scale: bool = False):
        """L2-normalised embeddings [B, dim] of right-padded ``ids`` (and ``scale()`` when ``with_scale``: the
        temperature must come out of the forward call for DDP to see it used and reduce its gradient)."""
        pooled = pool(self.gpt.hidden_states(ids), lengths, self.pooling)
        if self.proj is not None:
            pooled = self.proj(pooled)
        embeddings = F.normalize(pooled.float(), dim=-1)
        return (embeddings, self.scale()) if with_scale else embeddings

    def scale(self) -> torch.Tensor:
        """1 / temperature, with the temperature clamped to [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
        return self.log_inv_temperature.clamp(math.log(1 / MAX_TEMPERATURE), math.log(1 / MIN_TEMPERATURE)).exp()


def info_nce(queries: torch.Tensor, documents: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of each side is the positive of row i of the other, every other row a negative.

    The mean of the query->document and document->query cross-entropies over ``scale * cosine`` logits.
    """
    logits = scale * queries @ documents.T
    labels = torch.arange(len(queries), device=queries.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


Chunk = tuple[torch.Tensor, torch.Tensor]  # (ids, lengths) of a few texts


@contextlib.contextmanager
def _replay_rng(state: dict):
    """Run the block with the CPU (and CUDA) random state ``state``, so dropout masks repeat exactly."""
    devices = list(range(torch.cuda.device_count())) if "cuda" in state else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state["cpu"])
        if devices:
            torch.cuda.set_rng_state_all(state["cuda"])
        yield


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _gather_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Every process's ``rows`` concatenated in rank order (``rows`` itself in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    parts = [torch.empty_like(rows) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


def grad_cache_step(
    model: EmbeddingModel,
    query_chunks: list[Chunk],
    document_chunks: list[Chunk],
    loss_weight: float = 1.0,
    sync_context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """One contrastive step over the whole batch with the memory of one chunk (GradCache, Gao et al. 2021).

    1. Embed every chunk without building a graph. 2. Compute InfoNCE over the full batch on those embeddings
    and backpropagate to them only (and to the temperature). 3. Re-run each chunk with a graph and backpropagate
    its cached embedding gradients into the model. The parameter gradients equal the full-batch loss's
    (``tests/test_embed_model.py`` checks it); dropout masks are replayed from saved random states.
    ``sync_context`` (e.g. DDP's ``no_sync``) wraps every chunk backward but the last, so gradients are
    all-reduced once. Returns the detached loss.

    Under torchrun the cached embeddings of every process are gathered, so each query's negatives span the
    global batch (what makes large-batch contrastive training work) and the loss is the same one process would
    compute on the whole batch. Each process then backpropagates the global loss's gradient for its own rows,
    times the world size since DDP averages gradients, and the temperature's gradient (the same on every rank)
    flows through the last chunk's forward call, inside DDP.
    """
    chunks = query_chunks + document_chunks
    states, cached = [], []
    with torch.no_grad():
        for ids, lengths in chunks:
            states.append(_rng_state())
            embeddings, scale = model(ids, lengths, with_scale=True)
            cached.append(embeddings)
    n_query = len(query_chunks)
    local_queries, local_documents = torch.cat(cached[:n_query]), torch.cat(cached[n_query:])
    queries = _gather_ranks(local_queries).requires_grad_()
    documents = _gather_ranks(local_documents).requires_grad_()
    scale = scale.detach().requires_grad_()
    loss = info_nce(queries, documents, scale)
    (loss * loss_weight).backward()
    world = len(queries) // len(local_queries)
    rank = torch.distributed.get_rank() if world > 1 else 0
    mine = slice(rank * len(local_queries), (rank + 1) * len(local_queries))
    grads = list((queries.grad[mine] * world).split([len(c[0]) for c in query_chunks])) + list(
        (documents.grad[mine] * world).split([len(c[0]) for c in document_chunks])
    )
    for i, ((ids, lengths), state, grad) in enumerate(zip(chunks, states, grads)):
        last = i == len(chunks) - 1
        with contextlib.nullcontext() if last or sync_context is None else sync_context(), _replay_rng(state):
            if last:
                torch.autograd.backward(model(ids, lengths, with_scale=True), (grad, scale.grad))
            else:
                model(ids, lengths).backward(grad)
    return loss.detach()


class ChatforgeEmbedder:
    """A trained (or untrained) ``EmbeddingModel`` with its tokenizer: texts in, numpy vectors out."""

    def __init__(
        self,
        model: EmbeddingModel,
        tokenizer,
        spec: EmbedSpec,
        name: str = "chatforge-embed",
        path: str | None = None,
        batch_size: int = 32,
        info: dict | None = None,
    ):
        spec.validate()
        self.model = model
        self.tokenizer = tokenizer
        self.spec_ = spec
        self.name = name
        self.path = path
        self.batch_size = batch_size
        self.dim = model.dim
        self.info = dict(info or {})  # provenance saved with the model: base checkpoint, steps, data

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, texts: Sequence[str], role: str) -> Chunk:
        ids, lengths = encode_texts(self.tokenizer, texts, role, self.spec_, self.model.gpt.config.block_size)
        return ids.to(self.device), lengths

    @torch.no_grad()
    def embed(self, texts: Sequence[str], role: str = "document") -> np.ndarray:
        """L2-normalised float32 embeddings [len(texts), dim]; texts of similar length are batched together."""
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        try:
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                out[rows] = self.model(*self.encode([texts[i] for i in rows], role)).cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    def chunk(self, text: str, chunk_tokens: int, overlap: int) -> list[str]:
        ids = self.tokenizer.encode(text)
        if not ids:
            return []
        return [self.tokenizer.decode(ids[a:b]) for a, b in token_windows(len(ids), chunk_tokens, overlap)]

    def save(self, directory: str | Path) -> None:
        """Write weights, spec, GPT shape, tokenizer and ``info`` to ``directory`` at once."""
        directory = Path(directory)
        with atomic_directory(directory) as staging:
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, str(staging / WEIGHTS_FILE))
            self.tokenizer.save(staging)
            meta = {
                "format": EMBEDDER_FORMAT,
                "name": self.name,
                "spec": self.spec_.to_dict(),
                "gpt": self.model.gpt.config.to_dict(),
                "info": self.info,
            }
            (staging / EMBEDDER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        self.path = str(directory.resolve())

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> "ChatforgeEmbedder":
        """An embedder saved by ``save``; ``path`` may also be the ``embed`` stage's run directory."""
        path = Path(path)
        if (path / "embedder" / EMBEDDER_FILE).is_file():
            path = path / "embedder"
        if not (path / EMBEDDER_FILE).is_file():
            raise ChatforgeError(
                f"no embedding model at {path} (missing {EMBEDDER_FILE}); train one with `chatforge embed`"
            )
        meta = io.read_json(path / EMBEDDER_FILE, "embedder metadata")
        if meta.get("format") != EMBEDDER_FORMAT:
            raise ChatforgeError(
                f"{path} holds embedder format {meta.get('format')}, this chatforge reads {EMBEDDER_FORMAT}"
            )
        if not isinstance(meta.get("spec"), dict) or not isinstance(meta.get("gpt"), dict):
            raise ChatforgeError(f"{path / EMBEDDER_FILE}: 'spec' and 'gpt' must be objects")
        if not isinstance(meta.get("info", {}), dict) or not isinstance(meta.get("name", ""), str):
            raise ChatforgeError(f"{path / EMBEDDER_FILE}: 'info' must be an object and 'name' a string")
        try:
            spec = config_from_dict(EmbedSpec, meta["spec"])
        except ChatforgeError as exc:
            raise ChatforgeError(f"{path / EMBEDDER_FILE}: {exc}") from None
        gpt_config = recorded_gpt_config(path / EMBEDDER_FILE, meta["gpt"])
        try:
            with torch.device("meta"):  # shapes only, so a damaged config naming a huge model allocates nothing
                model = EmbeddingModel(GPT(gpt_config), spec.pooling, spec.proj_dim)
        except (TypeError, RuntimeError, OverflowError) as exc:  # sizes past what torch can even describe
            raise ChatforgeError(f"{path / EMBEDDER_FILE}: the model it records cannot be built ({exc})") from None
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = read_safetensors(path / WEIGHTS_FILE)
        if {k: tuple(v.shape) for k, v in state.items()} != expected:
            raise ChatforgeError(f"{path / WEIGHTS_FILE} does not fit the model {path / EMBEDDER_FILE} records")
        tokenizer = Tokenizer.load(path)
        for role in ("query", "document"):
            try:
                framing(tokenizer, role, spec, gpt_config.block_size)
            except ChatforgeError as exc:
                raise ChatforgeError(f"{path / EMBEDDER_FILE}: {exc}") from None
        model = EmbeddingModel(GPT(gpt_config), spec.pooling, spec.proj_dim)
        model.load_state_dict(state)
        model.to(device or default_device()).eval()
        return cls(
            model,
            tokenizer,
            spec,
            name=meta.get("name", "chatforge-embed"),
            path=str(path.resolve()),
            info=meta.get("info"),
        )

    def spec(self) -> dict:
        if self.path is None:
            raise ChatforgeError(
                f"embedder {self.name} was never saved, so an index built with it cannot be reloaded; save it first"
            )
        return {"type": "chatforge", "path": str(self.path)}

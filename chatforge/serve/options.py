"""The server's options (``chatforge serve --help`` lists them) and the cards of the models it serves."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from chatforge.config import option
from chatforge.data.rankings import MAX_K, MIN_K
from chatforge.errors import ChatforgeError, ConfigError


@dataclass
class ServeOptions:
    model_name: str = option("", "model id clients send in 'model' (default: the checkpoint folder's name)")
    api_keys: list[str] = option([], "accepted Bearer API keys, comma-separated (none = no authentication)")
    api_keys_file: str = option("", "file with one accepted API key per line (keeps keys off the command line)")
    allowed_hosts: list[str] = option([], "Host header values accepted (default: localhost names without keys, "
                                          "any with keys; '*' = any): stops DNS-rebinding pages")
    rate_limit: float = option(0.0, "requests per minute per API key (per client without keys); 0 = off")
    token_rate_limit: float = option(0.0, "tokens per minute per API key (prompt + n x max_tokens); 0 = off")
    max_concurrent: int = option(8, "requests one API key (one client without keys) may have running at once")
    feedback_writes_per_minute: float = option(120.0, "feedback writes per minute per API key (client); 0 = off")
    max_request_bytes: int = option(1_048_576, "largest request body; bigger ones get a 413")
    max_tokens: int = option(1024, "most tokens one request may ask to generate (capped by the context)")
    max_samples: int = option(16, "largest n and best_of of one request")
    max_waiting: int = option(256, "sequences waiting for a slot beyond which new requests get a 503")
    header_timeout: float = option(10.0, "seconds a client has to send a request's headers (slow clients are cut)")
    body_timeout: float = option(30.0, "seconds a client has to send a request's body")
    keep_alive_timeout: float = option(5.0, "seconds an idle keep-alive connection stays open")
    max_connections: int = option(256, "open connections beyond which new requests get a 503")
    request_timeout: float = option(600.0, "seconds a request may run (tool calls included) before it is "
                                           "cancelled")
    compare_k: int = option(4, "answers side by side in the web page's compare mode (4..9, what a ranking needs)")
    fim: bool = option(False, "the model was trained for fill-in-the-middle, so /v1/completions accepts 'suffix' "
                              "(also on when the checkpoint's config.json says \"fim\": true)")
    tools: list[str] = option([], "built-in tools run server-side in every chat request: calculator, retrieval")
    index: str = option("", "search index of the retrieval tool (built by `chatforge search --build`)")
    max_tool_calls: int = option(3, "tool calls the model may make per answer")
    safety_policy: str = option("", "content-filter policy (TOML/YAML/JSON, see chatforge.safety.filters) applied to "
                                    "prompts and answers; empty = no filtering (/v1/moderations then checks PII only)")

    def validate(self) -> None:
        for name in ("max_request_bytes", "max_tokens", "max_samples", "max_waiting", "max_concurrent",
                     "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1; got {getattr(self, name)}")
        for name in ("rate_limit", "token_rate_limit", "feedback_writes_per_minute"):
            if getattr(self, name) < 0:
                raise ConfigError(f"option '{name}' must be >= 0 (0 = off); got {getattr(self, name)}")
        for name in ("request_timeout", "header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"option '{name}' must be > 0 seconds; got {getattr(self, name)}")
        if self.max_tool_calls < 0:
            raise ConfigError(f"option 'max_tool_calls' must be >= 0 (0 = answer without calls); "
                              f"got {self.max_tool_calls}")
        if not MIN_K <= self.compare_k <= MAX_K:
            raise ConfigError(f"option 'compare_k' must be in {MIN_K}..{MAX_K} (a ranking for the reward model "
                              f"compares that many answers); got {self.compare_k}")

    def keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_keys_file:
            path = Path(self.api_keys_file)
            if not path.is_file():
                raise ChatforgeError(f"API keys file not found: {path}")
            keys += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return keys


@dataclass
class ModelCard:
    id: str
    context_length: int
    kind: str = "chat"  # chat (chat and text completions) or embedding
    fim: bool = False
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def to_json(self) -> dict:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "chatforge",
                "context_length": self.context_length, "kind": self.kind, "fim": self.fim}

"""The inference engine: one object that the CLI, evals, PPO rollouts, the chat CLI and the server all use.

    engine = Engine(model, tokenizer)
    engine.generate(["Once upon", ids], SamplingParams(temperature=0.8, n=2))  # batched, continuous
    for delta in engine.stream("Once upon", params): print(delta.text, end="")
    engine.beam_search("Once upon", width=4)
    engine.score(prompt_ids, continuation_ids)                                # eval log-likelihoods
    Scheduler(engine).submit(prompt, params)                                   # many threads / asyncio

Prompts are text or token ids (chat templates build ids with special tokens).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from chatforge.errors import ChatforgeError
from chatforge.infer.beam import Beam, beam_search
from chatforge.infer.detokenizer import IncrementalDetokenizer
from chatforge.infer.outputs import Completion, Delta
from chatforge.infer.params import ParamError, SamplingParams
from chatforge.infer.precision import InferenceOptions, compiled_chunk, compiled_step, inference_model
from chatforge.infer.runner import BatchRunner, Event, Prepared, decode_chunk, decode_step
from chatforge.infer.sampling import token_logprobs
from chatforge.tokenizer import END_OF_TEXT, END_OF_TURN

Prompt = str | Sequence[int]
_END_TOKENS = (END_OF_TEXT, END_OF_TURN)  # stop a sample unless the request sets ignore_eos


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample ``index`` of a request seeded with ``seed``: distinct for distinct (seed, index < 1000003)."""
    return (seed * 1_000_003 + index) % 2**63


class Engine:
    """Decoding with a KV cache for a GPT-like ``model`` (``model(idx, kv_cache=cache) -> (logits, _)``).

    ``device``, when given, moves the model there. ``max_batch_size`` is the number of KV-cache slots, i.e.
    how many sequences decode together. ``options`` (dtype, quantization, compilation) decide how decoding
    computes; without them the model is used exactly as given. ``model`` stays the caller's: a converted copy
    decodes, and ``refresh`` re-copies it after the caller changed the weights (PPO between rollouts).
    """

    def __init__(self, model, tokenizer=None, device: str | torch.device | None = None, max_batch_size: int = 16,
                 options: InferenceOptions | None = None):
        if max_batch_size < 1:
            raise ChatforgeError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if device is not None:
            model = model.to(device=device)
        self.source = model
        self.options = options or InferenceOptions(dtype="fp32")
        self.model = inference_model(model, self.options)
        self.device = next(model.parameters()).device
        self._decode = compiled_step(decode_step, self.options, self.device)
        self._decode_chunk = compiled_chunk(decode_chunk, self.options, self.device)
        self._compiled = self._decode is not decode_step
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.block_size = model.config.block_size
        self.vocab_size = model.config.vocab_size
        if tokenizer is not None:
            if tokenizer.vocab_size > self.vocab_size:
                raise ChatforgeError(
                    f"tokenizer has {tokenizer.vocab_size} tokens but the model only {self.vocab_size}"
                )
            self.vocab_size = tokenizer.vocab_size  # ids past the tokenizer (padding rows) are never sampled
        specials = getattr(tokenizer, "specials", {})
        self.special_ids = frozenset(specials.values())
        self.end_ids = [specials[name] for name in _END_TOKENS if name in specials]

    # ---- preparing requests --------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text or id-list prompt; an empty prompt starts a new document (end-of-text token)."""
        ids = self._token_ids("prompt", prompt)
        if not ids:
            if not self.end_ids:
                raise ChatforgeError("empty prompt (and no end-of-text token to start from)")
            ids = self.end_ids[:1]
        return ids

    def _token_ids(self, what: str, text_or_ids: Prompt) -> list[int]:
        if isinstance(text_or_ids, str):
            if self.tokenizer is None:
                raise ChatforgeError(f"this engine has no tokenizer: give the {what} as token ids")
            return self.tokenizer.encode(text_or_ids)
        ids = [int(t) for t in text_or_ids]
        self._check_ids(what, ids)
        return ids

    def _check_ids(self, what: str, ids) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ParamError(what, f"{what}: token id {bad} is outside the vocabulary (size {self.vocab_size})")

    def prepare(self, prompt: Prompt, params: SamplingParams | None = None) -> Prepared:
        """Validate a request and fit it into the context window (or fail with a message saying how)."""
        params = self.check_params(params or SamplingParams())
        ids = self.encode(prompt)
        if params.stop and self.tokenizer is None:
            raise ChatforgeError("stop strings need a tokenizer; give stop_token_ids instead")
        room = params.max_tokens or 1
        if room >= self.block_size:
            raise ChatforgeError(
                f"max_tokens={params.max_tokens} leaves no room for a prompt in the model's context "
                f"of {self.block_size} tokens"
            )
        if len(ids) + room > self.block_size:
            if not params.truncate:
                raise ChatforgeError(
                    f"prompt of {len(ids)} tokens + max_tokens={room} exceeds the model's context of {self.block_size} "
                    "tokens; shorten the prompt, lower max_tokens or set truncate=true to drop the oldest tokens"
                )
            ids = ids[len(ids) + room - self.block_size :]
        stop_ids = list(dict.fromkeys(params.stop_token_ids + ([] if params.ignore_eos else self.end_ids)))
        return Prepared(ids, params, params.max_tokens or self.block_size - len(ids), stop_ids)

    def check_params(self, params: SamplingParams) -> SamplingParams:
        """``params`` validated, and within this model's vocabulary (ParamError names the setting)."""
        params.validate()
        self._check_ids("logit_bias", params.logit_bias)
        self._check_ids("stop_token_ids", params.stop_token_ids)
        if params.top_k > self.vocab_size:
            raise ParamError("top_k", f"top_k must be at most the vocabulary size {self.vocab_size} (0 = off), "
                                      f"got {params.top_k}")
        return params

    def new_detokenizer(self, params: SamplingParams) -> IncrementalDetokenizer:
        decode = self.tokenizer.decode_bytes if self.tokenizer is not None else (lambda ids: b"")
        skip = self.special_ids if params.skip_special_tokens else ()
        return IncrementalDetokenizer(decode, params.stop, skip)

    def new_generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        """Each sample draws from its own generator, so batching never changes what a seed produces."""
        if params.greedy:
            return None
        # unseeded requests still follow torch's global RNG, so torch.manual_seed reproduces a whole run
        seed = sample_seed(params.seed, index) if params.seed is not None else int(torch.randint(2**62, ()).item())
        return torch.Generator(device=self.device).manual_seed(seed)

    def refresh(self) -> None:
        """Decode with the source model's current weights (a converted copy goes stale when they change)."""
        if self.model is not self.source:
            self.model = inference_model(self.source, self.options)

    def new_runner(self, max_batch_size: int | None = None, max_len: int | None = None) -> BatchRunner:
        """A continuous-batching loop over a fresh KV cache (the Scheduler keeps one for its lifetime)."""
        slots = max_batch_size or self.max_batch_size
        if self._compiled:
            # a compiled step is specialised to the cache's shape: power-of-two slot counts and the full
            # context keep the number of shapes (and so of compilations) small
            slots, max_len = min(1 << (slots - 1).bit_length(), self.max_batch_size), None
        return BatchRunner(
            self.model,
            self.vocab_size,
            slots,
            max_len or self.block_size,
            self.new_detokenizer,
            self.new_generator,
            self._decode,
            self._decode_chunk,
        )

    @contextlib.contextmanager
    def inference(self):
        """Eval mode and no autograd, restoring the model's mode after (PPO trains the same model)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    # ---- generation ----------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[Completion]:
        """Complete every prompt, each with its own settings if ``params`` is a list, in continuous batches."""
        if isinstance(prompts, str):
            raise ChatforgeError("generate takes a list of prompts; use [prompt] for one")
        settings = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(settings) != len(prompts):
            raise ChatforgeError(f"{len(prompts)} prompts but {len(settings)} sampling params")
        prepared = [self.prepare(p, s) for p, s in zip(prompts, settings)]
        if not prepared:
            return []
        longest = max(len(p.prompt_ids) + p.max_new_tokens for p in prepared)
        width = min(self.max_batch_size, sum(p.params.num_samples for p in prepared))
        with self.inference():
            runner = self.new_runner(width, longest)
            requests = [runner.add(p) for p in prepared]
            while runner.busy:
                runner.step()
                for _, exc in runner.take_failures():
                    raise exc
        return [r.completion for r in requests]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> "Stream":
        """Deltas of one request as they are decoded (text never splits a character or leaks a stop string);
        the returned iterator's ``completion`` is set once it is exhausted."""
        prepared = self.prepare(prompt, params)
        return Stream(prepared.prompt_ids, self._events(prepared))

    def _events(self, prepared: Prepared) -> Iterator[Event]:
        with self.inference():
            runner = self.new_runner(prepared.params.num_samples, len(prepared.prompt_ids) + prepared.max_new_tokens)
            runner.add(prepared)
        while runner.busy:
            for phase in (runner.admit, runner.decode):  # the first token is out before the first chunk
                with self.inference():  # not held across yields: the caller's code must not run in inference mode
                    events = phase()
                for _, exc in runner.take_failures():
                    raise exc
                for _, event in events:
                    yield event

    def beam_search(
        self,
        prompt: Prompt,
        width: int = 4,
        max_tokens: int | None = 64,
        length_penalty: float = 1.0,
        early_stopping: bool = False,
        n: int = 1,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[Beam]:
        """The ``n`` best of ``width`` beams, best first, scored by sum log-prob / length**length_penalty."""
        if not 1 <= n <= width:
            raise ChatforgeError(f"beam search needs 1 <= n <= width; got n={n}, width={width}")
        settings = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=list(stop_token_ids or []))
        prepared = self.prepare(prompt, settings)
        with self.inference():
            beams = beam_search(
                self.model,
                prepared.prompt_ids,
                width,
                prepared.max_new_tokens,
                length_penalty,
                early_stopping,
                prepared.stop_ids,
                self.vocab_size,
            )
        for beam in beams[:n]:
            detok = self.new_detokenizer(prepared.params)
            for token in beam.token_ids:
                if token not in prepared.stop_ids:
                    detok.add(token)
            detok.finish()
            beam.text = detok.text
        return beams[:n]

    # ---- scoring -------------------------------------------------------------------------------------------

    def score(self, prompt: Prompt, continuation: Prompt) -> list[float]:
        """Log-prob of each continuation token given the prompt and the continuation's earlier tokens."""
        return self.score_batch([(prompt, continuation)])[0]

    def score_batch(self, pairs: Sequence[tuple[Prompt, Prompt]], truncate: bool = False) -> list[list[float]]:
        """``score`` of many (prompt, continuation) pairs, batched. With ``truncate``, prompts that do not fit
        lose their oldest tokens; otherwise they are an error."""
        rows = []
        for i, (prompt, continuation) in enumerate(pairs):
            p_ids = self.encode(prompt)
            c_ids = self._token_ids("continuation", continuation)
            if not c_ids:
                raise ChatforgeError(f"pair {i}: the continuation to score is empty")
            excess = len(p_ids) + len(c_ids) - self.block_size
            if excess > 0:
                if not truncate or excess >= len(p_ids):
                    raise ChatforgeError(
                        f"pair {i}: {len(p_ids)} + {len(c_ids)} tokens exceed the model's context of {self.block_size}"
                    )
                p_ids = p_ids[excess:]
            rows.append((p_ids, c_ids))
        results = []
        with self.inference():
            for start in range(0, len(rows), self.max_batch_size):
                results += self._score_chunk(rows[start : start + self.max_batch_size])
        return results

    def _score_chunk(self, rows: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)  # right padding: causal, so harmless
        for i, (p, c) in enumerate(rows):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        logits = self.model(ids)[0][..., : self.vocab_size]
        out = []
        for i, (p, c) in enumerate(rows):
            positions = slice(len(p) - 1, len(p) + len(c) - 1)  # logits at t predict token t + 1
            chosen, _, _ = token_logprobs(logits[i, positions], ids[i, len(p) : len(p) + len(c)], 0)
            out.append(chosen.tolist())
        return out


class Stream:
    """Iterator over one request's deltas; ``completion`` holds the whole result once it is exhausted."""

    def __init__(self, prompt_ids: list[int], events: Iterator[Event]):
        self.prompt_ids = prompt_ids  # as decoded: after truncation, if the request asked for it
        self.completion: Completion | None = None
        self._events = events

    def __iter__(self) -> Iterator[Delta]:
        for event in self._events:
            if isinstance(event, Completion):
                self.completion = event
            else:
                yield event

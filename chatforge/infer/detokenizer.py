"""Token ids to text, one token at a time, safe to stream.

Byte-level BPE tokens can end in the middle of a UTF-8 character, and a stop string can be spread over
several tokens. The detokenizer therefore holds back (1) the bytes of an unfinished character and (2) the
longest tail of the text that could still grow into a stop string, so no delta ever contains half a
character or text that is later cut.
"""

from __future__ import annotations

import codecs
from typing import Callable, Iterable


def held_back(text: str, stops: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``stops``."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class IncrementalDetokenizer:
    """Accumulates the text of generated tokens, cut at the first stop string."""

    def __init__(self, decode_bytes: Callable[[list[int]], bytes], stop: Iterable[str] = (),
                 skip_ids: Iterable[int] = ()):
        self._decode_bytes = decode_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # keeps partial characters
        self._stops = [s for s in stop if s]
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self._skip = frozenset(skip_ids)
        self.text = ""
        self.stopped = False  # a stop string was found; text ends before it
        self._emitted = 0
        self._final = False

    def add(self, token_id: int) -> bool:
        """Append one token's text; returns True when it completed a stop string."""
        if self.stopped or token_id in self._skip:
            return self.stopped
        piece = self._utf8.decode(self._decode_bytes([token_id]))
        if piece:
            self._append(piece)
        return self.stopped

    def finish(self) -> None:
        """No more tokens: flush an unfinished character (as U+FFFD) and release held-back text."""
        if not self.stopped:
            tail = self._utf8.decode(b"", final=True)
            if tail:
                self._append(tail)
        self._final = True

    def _append(self, piece: str) -> None:
        # a stop string found now must end inside the new piece, so only that window is searched
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def delta(self) -> str:
        """Text that became safe to show since the previous call."""
        safe = len(self.text)
        if not (self.stopped or self._final):
            safe -= held_back(self.text, self._stops)
        out = self.text[self._emitted : safe]
        self._emitted = safe
        return out

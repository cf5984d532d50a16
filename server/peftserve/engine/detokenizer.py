"""Incremental detokenization and stop strings: turns generated tokens into text deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

# Decoding restarts this many tokens back, so tokenizers that drop a leading space when a
# sequence starts mid-word (SentencePiece) still produce the right text for the new tokens.
_CONTEXT_TOKENS = 5


@dataclass
class IncrementalDetokenizer:
    """Per request: feeds on token ids, yields text that is final (never revised later).

    Deltas concatenate to exactly the final text. Text that might be the start of a stop string
    is held back until it is known not to be one; a stop string ends the text before it.
    """

    tokenizer: object
    prompt_ids: list[int]
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""
    """All text decoded so far (including held-back text)."""
    emitted: int = 0
    """Characters of ``text`` already handed out."""
    stopped: bool = False

    def __post_init__(self) -> None:
        self.ids = list(self.prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self.ids)
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text that became final."""
        self.ids.append(token_id)
        new = self._decode(self.ids[self._prefix :])
        if new.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        old = self._decode(self.ids[self._prefix : self._read])
        self.text += new[len(old) :]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self.stop:
            start = max(0, self.emitted - self._hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self.flush()
        end = max(self.emitted, len(self.text) - self._hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def flush(self) -> str:
        """At the end of generation: hand out everything held back."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

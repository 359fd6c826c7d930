"""A sentencepiece tokenizer with BOS/EOS handling and streaming-safe incremental decoding."""
from pathlib import Path

import sentencepiece as spm

from tinytis.errors import UserError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.v3")


class Tokenizer:
    def __init__(self, model_file: Path):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise UserError(f"cannot load tokenizer {model_file}: {e}")
        self.model_file, self.bos_id, self.eos_id = model_file, self.sp.bos_id(), self.sp.eos_id()

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer":
        for name in TOKENIZER_FILES:
            if (path / name).exists():
                return cls(path / name)
        raise UserError(f"{path} has no tokenizer.model or tokenizer.model.v3")

    def require_bos_eos(self):
        """Training and evaluation put BOS before a context and EOS after an answer: a tokenizer without them cannot."""
        missing = [name for name, i in (("BOS", self.bos_id), ("EOS", self.eos_id)) if i < 0]
        if missing:
            raise UserError(f"tokenizer {self.model_file} has no {' or '.join(missing)} token; tinytis needs both "
                            "(BOS starts a context, EOS ends an answer)")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def is_plain(self, token_id: int) -> bool:
        """A text piece: not a control token, <unk> or a byte-fallback byte."""
        return not (self.sp.is_control(token_id) or self.sp.is_unknown(token_id) or self.sp.is_byte(token_id))


class StreamDecoder:
    """Turns generated ids into text pieces as they arrive.

    Decoding ids one by one would lose sentencepiece's word-boundary spaces and split multi-byte
    characters built from byte-fallback pieces. So each step decodes the ids since the last plain
    piece (the text after a plain piece does not depend on what came before it) and emits only
    what has become stable: text ending in U+FFFD is a character still waiting for its remaining
    bytes and is held back until more ids arrive or flush() is called.
    """

    def __init__(self, tokenizer: Tokenizer, prefix: list[int] = ()):
        self.tokenizer = tokenizer
        self._restart(list(prefix))  # the prompt's last plain piece gives the first piece its leading space

    def _restart(self, ids: list[int]):
        """Keep ids from the last plain piece on; their text counts as emitted."""
        plain = [i for i, t in enumerate(ids) if self.tokenizer.is_plain(t)]
        self.ids = ids[plain[-1] :] if plain else ids
        self.emitted = len(self.tokenizer.decode(self.ids))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[self.emitted :]
        self._restart(self.ids)
        return new

    def flush(self) -> str:
        """The text held back at the end of generation (an incomplete character decodes as U+FFFD)."""
        new = self.tokenizer.decode(self.ids)[self.emitted :]
        self._restart(self.ids)
        return new

"""Tokenizer against sentencepiece's own API (and mistral-common's wrapper for BOS/EOS) on the Mistral v3 model."""
import random
from pathlib import Path

import pytest
import sentencepiece as spm

from tinytis.tokenizer import StreamDecoder, Tokenizer

mistral_common = pytest.importorskip("mistral_common")
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer  # noqa: E402

V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"

POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n",
    ".,;:!?'\"()[]{}<>-_/\\@#$%^&*+=~`|",
    "éèêëàâäôöûüçñßøåæœÉÀÇÑ",
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
    "日本語中文汉字한국어ひらがなカタカナ",
    "αβγδεζηθλμπσω∑∫√∞≈≠≤≥",
    "😀👍🏽🚀🇫🇷❤️‍🔥🧪",
    "\u0301\u0308\u200b\u00a0\u2028\ufeff",  # combining marks, zero width space, no-break space, line separator, BOM
]


def varied_strings(n=200, seed=0):
    """Deterministic strings mixing words, digit runs, whitespace runs and characters from several scripts."""
    rng = random.Random(seed)
    strings = ["", " ", "  leading spaces", "trailing spaces   ", "1234567890", "\n\n\n", "a\tb\t\tc"]
    while len(strings) < n:
        parts = []
        for _ in range(rng.randint(1, 12)):
            pool = rng.choice(POOLS)
            run = rng.randint(1, 8) if pool != " \t\n" else rng.randint(1, 5)
            parts.append("".join(rng.choice(pool) for _ in range(run)))
            if rng.random() < 0.5:
                parts.append(" ")
        strings.append("".join(parts))
    return strings


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(V3)


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(V3))


def test_v3_model(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32768, 1, 2)


def test_encode_decode_match_sentencepiece(tok, sp):
    mc = SentencePieceTokenizer(str(V3))
    for text in varied_strings():
        ids = sp.encode(text)
        assert tok.encode(text, bos=False) == ids
        assert tok.encode(text) == [1] + ids == mc.encode(text, bos=True, eos=False)
        assert tok.encode(text, eos=True) == [1] + ids + [2] == mc.encode(text, bos=True, eos=True)
        assert tok.decode(ids) == sp.decode(ids)
        assert tok.decode([1] + ids + [2]) == sp.decode(ids)


def test_digits_are_split(tok, sp):
    assert [sp.id_to_piece(i) for i in tok.encode("2024", bos=False)] == ["▁", "2", "0", "2", "4"]


def stream(tok, ids, prefix=()):
    decoder = StreamDecoder(tok, list(prefix))
    pieces = [decoder.push(i) for i in ids]
    return pieces + [decoder.flush()]


def test_stream_pieces_join_to_the_full_decode(tok):
    strings = varied_strings(seed=1)
    for prompt, answer in zip(strings[::2], strings[1::2]):
        p, a = tok.encode(prompt), tok.encode(answer, bos=False)
        assert "".join(stream(tok, a)) == tok.decode(a)
        # after a prompt, the stream is the text the answer adds to the prompt's text (leading space included)
        assert "".join(stream(tok, a, prefix=p)) == tok.decode(p + a)[len(tok.decode(p)):]


def test_stream_holds_back_partial_characters(tok, sp):
    ids = tok.encode("a 🦩 b", bos=False)
    pieces = [sp.id_to_piece(i) for i in ids]
    assert pieces == ["▁a", "▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0xA9>", "▁b"]  # the flamingo is four byte pieces
    assert stream(tok, ids) == ["a", " ", "", "", "", "🦩", " b", ""]


def test_stream_of_arbitrary_ids(tok):
    """Random ids, control tokens and stray bytes included (what an untrained model emits)."""
    assert tok.sp.id_to_piece(tok.sp.piece_to_id("<0x00>") + 0xFF) == "<0xFF>"
    rng = random.Random(2)
    byte = tok.sp.piece_to_id("<0x00>")
    special = [0, 1, 2, 3, 10, tok.sp.piece_to_id("▁"), tok.sp.piece_to_id("▁▁")] + list(range(byte + 0x80, byte + 0x100))
    for _ in range(300):
        pool = rng.choice([range(tok.vocab_size), special])
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 20))]
        assert "".join(stream(tok, ids)) == tok.decode(ids)

"""tokenizer.json (the `tokenizers` library's format) from a sentencepiece BPE tokenizer.model.

transformers' AutoTokenizer loads a model directory's tokenizer.json directly; without it, it has to convert
tokenizer.model, which needs protobuf and, in some versions, fails. The file written here encodes every text to the
same ids as sentencepiece: the normalizer does what sentencepiece's does (a leading "▁", spaces to "▁"), the BPE
merges are ordered as sentencepiece ranks its pieces (by score), and unknown characters fall back to byte pieces.
"""
import json
import os
from pathlib import Path

import sentencepiece as spm

from tinytis.errors import UserError

BPE = 2  # TrainerSpec.model_type


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _fields(buf: bytes) -> dict:
    """The last value of each field number of one protobuf message (varints as ints, the rest as bytes)."""
    fields, i = {}, 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number], i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            fields[number], i = buf[i : i + n], i + n
        else:  # 1: 64-bit, 5: 32-bit
            size = {1: 8, 5: 4}[wire]
            fields[number], i = buf[i : i + size], i + size
    return fields


def spec(sp: spm.SentencePieceProcessor) -> dict:
    """What the tokenizer.json needs from the model proto besides its pieces (defaults as in sentencepiece_model.proto)."""
    model = _fields(sp.serialized_model_proto())
    trainer, normalizer = _fields(model.get(2, b"")), _fields(model.get(3, b""))
    return {"bpe": trainer.get(3, 1) == BPE, "byte_fallback": bool(trainer.get(35, 0)),
            "rule": normalizer.get(1, b"nmt_nfkc").decode(), "charsmap": bool(normalizer.get(2)),
            "dummy_prefix": bool(normalizer.get(3, 1)), "extra_whitespaces": bool(normalizer.get(4, 1))}


def merges(sp: spm.SentencePieceProcessor) -> list[list[str]]:
    """Every (left, right) split of a normal piece into two pieces of the vocabulary, ranked by the merged piece's
    score (highest first: sentencepiece's BPE applies the best-scored merge first), then by the parts' ids."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    found = []
    for piece, i in vocab.items():
        if not sp.is_control(i) and not sp.is_unknown(i) and not sp.is_byte(i):
            splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
            found += [(-sp.get_score(i), vocab[l], vocab[r], l, r) for l, r in splits]
    return [[l, r] for *_, l, r in sorted(found)]


def tokenizer_json(model_file: Path) -> dict:
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    s = spec(sp)
    if not s["bpe"] or s["charsmap"] or s["rule"] != "identity" or s["extra_whitespaces"]:
        raise UserError(f"{model_file}: tokenizer.json is written for sentencepiece BPE models with identity "
                        "normalization only (as Mistral's and Llama 2's); this one differs")
    specials = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    added = [{"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in specials]
    bos = sp.id_to_piece(sp.bos_id())
    normalizer = [{"type": "Prepend", "prepend": "▁"}] * s["dummy_prefix"] + [
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    decoder = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
               {"type": "Fuse"}] + [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] * s["dummy_prefix"]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizer},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": decoder},
        "model": {"type": "BPE", "dropout": None, "unk_token": sp.id_to_piece(sp.unk_id()), "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": s["byte_fallback"], "ignore_merges": False,
                  "vocab": {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}, "merges": merges(sp)},
    }


def write_hf_tokenizer(model_dir: Path, model_max_length: int):
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json beside model_dir/tokenizer.model."""
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    bos, eos, unk = (sp.id_to_piece(i) for i in (sp.bos_id(), sp.eos_id(), sp.unk_id()))
    special = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True, "add_eos_token": False,
              "model_max_length": model_max_length}
    files = {"tokenizer.json": tokenizer_json(model_dir / "tokenizer.model"), "tokenizer_config.json": config,
             "special_tokens_map.json": special}
    for name, content in files.items():
        tmp = model_dir / (name + ".tmp")
        tmp.write_text(json.dumps(content, indent=1 if name == "tokenizer.json" else 2, ensure_ascii=False) + "\n")
        os.replace(tmp, model_dir / name)

"""Your own data in LongBench's JSONL schema: one JSON object per line with `context` (what is compressed), `input`
(the question asked after it), `answers` (the reference answers, a list of strings) and optionally `length` and
`_id`. The context and question are used verbatim (put a prompt template into them if the model wants one); an
answer is scored against every reference, the best counts (LongBench's max over answers, qa_f1 and exact match).
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tinytis.errors import UserError
from tinytis.tasks import Sample
from tinytis.tokenizer import Tokenizer

FIELDS = {"context": str, "input": str, "answers": list}
OPTIONAL = {"length": int, "_id": str}
KINDS = {str: "a string", list: "a list", int: "an integer"}


@dataclass
class Record(Sample):
    answers: tuple[str, ...] = ()
    id: str = ""


def parse(path: Path) -> list[Record]:
    """Every record of the file, checked field by field; a mistake is a UserError naming the line and the field."""
    if not path.is_file():
        raise UserError(f"--data {path}: no such file")
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {i}: not JSON ({e.msg}); each line must be one LongBench record")
        if not isinstance(r, dict):
            raise UserError(f"{path} line {i}: a record is a JSON object with context, input and answers")
        for field, kind in FIELDS.items():
            if field not in r:
                raise UserError(f"{path} line {i}: field {field!r} is missing (LongBench records have context, input, answers)")
            if not isinstance(r[field], kind):
                raise UserError(f"{path} line {i}: field {field!r} must be {KINDS[kind]}, not {type(r[field]).__name__}")
        if not r["answers"] or not all(isinstance(a, str) for a in r["answers"]):
            raise UserError(f"{path} line {i}: field 'answers' must be a non-empty list of strings")
        for field, kind in OPTIONAL.items():
            if field in r and (not isinstance(r[field], kind) or isinstance(r[field], bool)):
                raise UserError(f"{path} line {i}: field {field!r} must be {KINDS[kind]}, not {type(r[field]).__name__}")
        records.append(Record("longbench", r["context"], r["input"], r["answers"][0], r.get("length", 0), -1.0,
                              answers=tuple(r["answers"]), id=r.get("_id", str(i))))
    if not records:
        raise UserError(f"--data {path} holds no records; write one LongBench JSON object per line")
    return records


def truncate_middle(tok: Tokenizer, text: str, max_tokens: int) -> str:
    """LongBench's truncation: keep the first and last max_tokens / 2 tokens of a text longer than max_tokens."""
    ids = tok.encode(text, bos=False)
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    return tok.decode(ids[:half]) + tok.decode(ids[len(ids) - (max_tokens - half):])


def read(path: Path, tok: Tokenizer, max_len: int) -> list[Record]:
    """The file's records, contexts longer than max_len tokens truncated from the middle (said once, on stderr)."""
    tok.require_bos_eos()
    records = parse(path)
    long = 0
    for r in records:
        cut = truncate_middle(tok, r.context, max_len)
        long += cut is not r.context
        r.context = cut
    if long:
        print(f"warning: {long} of {len(records)} contexts in {path} are longer than {max_len} tokens; "
              "truncated from the middle, as LongBench does", file=sys.stderr)
    return records

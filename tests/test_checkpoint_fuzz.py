"""A checkpoint a user brings never crashes the loader and never loads silently wrong: a small checkpoint mutated
1,000+ ways (seeded) either loads to the same logits or fails with one UserError line, each within a time limit.

The one exception is named: a flipped byte inside a tensor's data that still decodes to a finite number is a
different model the format cannot tell apart (safetensors has no checksum); it must load (no crash) and is counted.
"""
import io
import json
import random
import shutil
import signal
import struct
from collections import Counter
from pathlib import Path

import sentencepiece as spm
import torch

from tinytis.config import ModelArgs
from tinytis.errors import UserError
from tinytis.model import Transformer
from tinytis.tokenizer import Tokenizer
from tinytis.weights import save_hf

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=300,
                 max_seq_len=256, rope_theta=1e4)
IDS = torch.tensor([[1, 17, 42, 99, 250, 7, 3, 200]])
LIMIT_S = 5  # CPU seconds per case (a wall-clock limit would measure the machine's load, not the loader)
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "X", 7, None]
CONFIG_VALUES = ["64", 64.0, -1, 0, True, None, [64], {"a": 1}, 2**40, 1e300, float("nan"), ""]


def _checkpoint(d: Path) -> Path:
    model = Transformer(ARGS)
    model.init_weights(seed=0, std=0.1)
    save_hf(model.state_dict(), d, ARGS)
    words = ["".join(random.Random(i).choice("abcdefgh") for _ in range(5)) for i in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(" ".join(words[i:i + 10]) for i in range(390)), model_writer=buf,
                                   vocab_size=ARGS.vocab_size, model_type="bpe", byte_fallback=True, minloglevel=2)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    return d


def _split(blob: bytes):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def header_mutation(rng: random.Random, blob: bytes) -> bytes:
    header, data = _split(blob)
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    kind = rng.randrange(9)
    if kind == 0:
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == 1:  # a dimension off by a little or a lot, or of the wrong type
        shape = entry["shape"]
        if shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, -1, shape[0] + 1, shape[-1] * 2, "8", 2.5, None])
    elif kind == 2:
        entry["shape"] = rng.choice([[], entry["shape"][::-1], entry["shape"] + [1], [entry["shape"][0]], "64"])
    elif kind == 3:  # offsets moved, swapped, out of the file, of the wrong type
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[a + 2, b + 2], [b, a], [a, b + 4], [a, len(data) + 64], [-4, b], [a, b - 2],
                                            [str(a), b], [a], None, [0, b - a]])
    elif kind == 4:
        del header[name]
    elif kind == 5:
        header[name + rng.choice(["x", ".1", ""])[:2] + "q"] = header.pop(name)
    elif kind == 6:
        header[rng.choice(["junk", "model.layers.9.mlp.up_proj.weight"])] = dict(entry)
    elif kind == 7:
        entry.pop(rng.choice(["dtype", "shape", "data_offsets"]))
    else:  # the header length field itself
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text) + rng.choice([-3, -1, 1, 9, 10**6, 2**63])) + text + data
    return _join(header, data)


def flip(rng: random.Random, blob: bytes, header_only: bool) -> bytes:
    n = struct.unpack("<Q", blob[:8])[0]
    at = rng.randrange(8 + n) if header_only else rng.randrange(8 + n, len(blob))
    return blob[:at] + bytes([blob[at] ^ (1 << rng.randrange(8))]) + blob[at + 1:]


def config_mutation(rng: random.Random, cfg: dict) -> tuple[str, str]:
    """(config.json text, its class): a number for rope_theta or rms_norm_eps is a valid config of another model,
    which no loader can tell from the weights: its own class, allowed to load to other logits."""
    key = rng.choice(sorted(cfg))
    kind = rng.randrange(4)
    if kind == 0:
        del cfg[key]
    elif kind == 1:
        cfg[key] = rng.choice(CONFIG_VALUES)
        if key in ("rope_theta", "rms_norm_eps") and type(cfg[key]) in (int, float):
            return json.dumps(cfg), "config.json rope_theta/eps value"
    elif kind == 2:
        return json.dumps(cfg)[: rng.randrange(1, 40)], "config.json"  # cut short: not JSON
    else:
        cfg[rng.choice(["num_hidden_layers", "hidden_size", "vocab_size", "num_key_value_heads", "head_dim",
                        "intermediate_size", "num_attention_heads"])] = rng.choice([1, 3, 8, 48, 96, 512, 10**6])
    return json.dumps(cfg), "config.json"


class Timeout(Exception):
    pass


def outcome(d: Path, reference) -> str:
    """'same', 'user_error' (one line), 'different' (loaded to other logits); anything else raises."""
    def alarm(*_):
        raise Timeout

    signal.signal(signal.SIGPROF, alarm)
    signal.setitimer(signal.ITIMER_PROF, LIMIT_S)
    try:
        if reference is None:  # the tokenizer cases
            Tokenizer.from_dir(d).encode("abcde fgh")
            return "same"
        with torch.no_grad():
            logits = Transformer.from_pretrained(d)(IDS)
        return "same" if torch.equal(logits, reference) else "different"
    except UserError as e:
        assert "\n" not in str(e), str(e)
        return "user_error"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)


def test_mutated_checkpoints_load_the_same_or_fail_in_one_line(tmp_path):
    src = _checkpoint(tmp_path / "src")
    with torch.no_grad():
        reference = Transformer.from_pretrained(src)(IDS)
    weights, config, tok = ((src / f).read_bytes() for f in ("model.safetensors", "config.json", "tokenizer.model"))
    rng = random.Random(17)
    plan = [("header field", 450), ("truncation", 120), ("header byte flip", 150), ("data byte flip", 150),
            ("config.json", 250), ("tokenizer.model cut short", 60)]
    results = Counter()
    case = tmp_path / "case"
    for kind, n in plan:
        for _ in range(n):
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(src, case)
            if kind == "header field":
                (case / "model.safetensors").write_bytes(header_mutation(rng, weights))
            elif kind == "truncation":
                (case / "model.safetensors").write_bytes(weights[: rng.randrange(len(weights))])
            elif kind.endswith("byte flip"):
                (case / "model.safetensors").write_bytes(flip(rng, weights, kind.startswith("header")))
            elif kind == "config.json":
                text, label = config_mutation(rng, json.loads(config))
                (case / "config.json").write_text(text)
            else:
                (case / "tokenizer.model").write_bytes(tok[: rng.randrange(len(tok))])
            label = label if kind == "config.json" else kind
            results[(label, outcome(case, None if kind.startswith("tokenizer") else reference))] += 1
    print("\n" + "\n".join(f"{kind:28s} {end:12s} {n}" for (kind, end), n in sorted(results.items())))
    assert sum(results.values()) >= 1000
    allowed = ("data byte flip", "config.json rope_theta/eps value")
    silent = {k: n for k, n in results.items() if k[1] == "different" and k[0] not in allowed}
    assert not silent, silent

"""tokenizer.json beside a model's tokenizer.model: transformers' AutoTokenizer loads it without protobuf or a
conversion (tokenizer.model removed) and gives sentencepiece's ids and text on varied strings."""
import shutil
from pathlib import Path

import pytest

from tests.test_tokenizer import V3, varied_strings
from tinytis.hf_tokenizer import write_hf_tokenizer
from tinytis.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("model_file", [ROOT / "models/tiny/tokenizer.model", V3], ids=["embedded", "mistral-v3"])
def test_autotokenizer_gives_sentencepiece_ids(tmp_path, model_file):
    shutil.copy(model_file, tmp_path / "tokenizer.model")
    write_hf_tokenizer(tmp_path, 4096)
    ours = Tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").unlink()  # nothing to convert: tokenizer.json alone
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == ours.vocab_size
    for text in varied_strings(300):
        ids = ours.encode(text)
        assert hf.encode(text) == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids), text


def test_a_unigram_tokenizer_is_refused_in_one_line(tmp_path):
    import sentencepiece as spm

    from tinytis.errors import UserError

    spm.SentencePieceTrainer.train(sentence_iterator=iter(["some words to train on here"] * 100), minloglevel=2,
                                   model_prefix=str(tmp_path / "tokenizer"), vocab_size=16, model_type="unigram")
    with pytest.raises(UserError, match="BPE models with identity normalization only"):
        write_hf_tokenizer(tmp_path, 4096)

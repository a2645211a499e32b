"""SentencePiece (`tokenizer.ggml.model = llama`) vocabularies in GGUF files written by llama.cpp's
converter (tests/data/gguf, .ci/gguf-converter): encode, decode and chat templates equal
transformers' GGUF tokenizer on the hard strings of test_tokenizer.py, for each architecture's
variant (Llama/Mistral/Mixtral: Metaspace prefix; Gemma: no prefix, merges by file order; Phi-3:
prefix by normalizer)."""

from pathlib import Path

import pytest
from gguf import GGUFReader
from test_tokenizer import CONVERSATIONS, TEXTS

from hearth.engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).parent / "data" / "gguf"
SENTENCEPIECE_FILES = ["llama-F16.gguf", "mixtral-Q8_0.gguf", "qwen2-F16.gguf",
                       "gemma2-F16.gguf", "gemma3-Q8_0.gguf", "phi3-F16.gguf"]


@pytest.fixture(scope="module", params=SENTENCEPIECE_FILES)
def pair(request):
    name = request.param
    ours = Tokenizer.from_gguf_metadata(GGUFReader(DATA / name))
    reference = transformers.AutoTokenizer.from_pretrained(DATA, gguf_file=name)
    return ours, reference


def test_the_files_hold_sentencepiece_vocabularies():
    for name in SENTENCEPIECE_FILES:
        field = GGUFReader(DATA / name).fields["tokenizer.ggml.model"]
        assert field.contents() == "llama", name


def test_encode_decode_match_transformers(pair):
    ours, reference = pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids), text
        assert ours.encode(text, add_special_tokens=False) == reference.encode(
            text, add_special_tokens=False), text


def test_byte_fallback_and_bos(pair):
    ours, _ = pair
    ids = ours.encode("🤖")
    assert ids[0] == ours.bos_token_id == 1  # llama.cpp adds BOS to SentencePiece vocabularies
    pieces = ours.convert_ids_to_tokens(ids[1:])
    assert [p for p in pieces if p.startswith("<0x")] == ["<0xF0>", "<0x9F>", "<0xA4>", "<0x96>"]
    assert ours.decode(ids) == "🤖"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, add_generation_prompt):
    ours, reference = pair
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        prompt = ours.apply_chat_template(messages, add_generation_prompt)
        assert prompt == expected
        assert ours.encode(prompt, add_special_tokens=False) == reference.encode(
            expected, add_special_tokens=False)


def test_byte_level_vocabulary_without_merges_roundtrips():
    """Qwen3-MoE's file: a byte-level vocabulary and no merges (transformers cannot read it)."""
    ours = Tokenizer.from_gguf_metadata(GGUFReader(DATA / "qwen3moe-F16.gguf"))
    for text in TEXTS:
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text

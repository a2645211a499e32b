"""Tokenizer: token-for-token against transformers on the default model's GGUF and on HF dirs."""

import json

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, processors

from hearth.engine.catalog import resolve_model
from hearth.engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The capital of France is",
    "  leading spaces and   runs\t\ttabs\n\n\nnewlines  ",
    "12345 + 678 = 99,999.5 and 3.14159e-10",
    "héllo wörld ñ 日本語のテキスト 中文 한국어",
    "emoji 🤖🔥👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<repo_name>hearth<file_sep>engine/tokenizer.py<|endoftext|>",
    "I'm sure you're right, they'll see we've done it. DON'T SHOUT",
    "",
    " ",
    "\n",
    "a" * 60,
    "https://example.com/path?q=1&r=2#frag",
    "<|endoftext|><|im_end|>x",
    "zero\u200bwidth\u00a0nbsp Ünïcödé",
    '{"json": [1, 2, {"k": null}], "s": "\\u00e9"}',
    "<s> </s> <unk> <|im_start <im_end|>",
    "مرحبا بالعالم — ΑΒΓ αβγ — Привет",
    "\x00\x01 control \x7f bytes",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of Italy?"},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke 😀\nwith two lines"},
    ],
]


@pytest.fixture(scope="module")
def default_gguf():
    return resolve_model(None).path


@pytest.fixture(scope="module")
def ours(default_gguf):
    from gguf import GGUFReader

    return Tokenizer.from_gguf_metadata(GGUFReader(default_gguf))


@pytest.fixture(scope="module")
def reference(default_gguf):
    return transformers.AutoTokenizer.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name
    )


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_decode_match_transformers(ours, reference, text):
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(ours, reference, messages, add_generation_prompt):
    expected = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(messages, add_generation_prompt) == expected


def test_gguf_special_tokens(ours):
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (2,))
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ours.vocab_size == 49152
    assert ours.all_special_ids == list(range(17))  # the 17 control tokens
    assert ours.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    assert ours.encode("<|im_start|>", add_special_tokens=True) == [1]  # add_bos is false
    assert ours.decode([1, 28, 2]) == ours.decode([28])


def test_hf_dir_saved_from_gguf_matches_transformers(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == reloaded.encode(text)
    for messages in CONVERSATIONS:
        expected = reloaded.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert ours.apply_chat_template(messages) == expected
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (2,))


TINY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] | tojson }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """A word-level vocabulary whose post-processor adds <s>, like a Llama tokenizer.json."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "!": 5}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
        "unk_token": "<unk>",
        "add_bos_token": True,
        "chat_template": TINY_TEMPLATE,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    return tmp_path


def test_tiny_hf_dir_matches_transformers(tiny_hf_dir):
    ours = Tokenizer.from_hf_dir(tiny_hf_dir)
    reference = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    for text in ["hello world !", "world hello", "unknown words here", ""]:
        assert ours.encode(text) == reference.encode(text)
        assert ours.encode(text)[:1] == [1]  # BOS once, from the post-processor
    messages = [{"role": "user", "content": 'say "hi" ☃'}, {"role": "assistant", "content": "hi"}]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    assert ours.eos_token_ids == (2, 5)  # tokenizer_config + generation_config
    with pytest.raises(ValueError, match="bad role"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_add_bos_is_prepended_when_the_backend_does_not(tiny_hf_dir):
    backend = Backend.from_file(str(tiny_hf_dir / "tokenizer.json"))
    backend.post_processor = None
    tok = Tokenizer(backend, bos_token_id=1, eos_token_ids=[2], add_bos_token=True)
    assert tok.encode("hello world") == [1, 3, 4]
    assert tok.encode("hello world", add_special_tokens=False) == [3, 4]
    assert tok.decode([1, 3, 2]) == "hello"


def test_chat_template_file_overrides_config(tiny_hf_dir):
    (tiny_hf_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    tok = Tokenizer.from_hf_dir(tiny_hf_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x!"
    assert tok.with_chat_template("T").apply_chat_template([]) == "T"


def test_no_chat_template_is_a_clear_error(tiny_hf_dir):
    tok = Tokenizer(Backend.from_file(str(tiny_hf_dir / "tokenizer.json")), 1, [2])
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_unsupported_gguf_tokenizers():
    base = {"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": []}
    with pytest.raises(ValueError, match="'rwkv' is not supported"):
        Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.model": "rwkv"})
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf_metadata(
            {**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery"}
        )


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_other_pre_tokenizers_split_like_their_regex(pre):
    # Byte-level vocabulary of single characters: the ids reveal the pre-token boundaries only
    # through the decode roundtrip, so check the split itself on the pre-tokenizer.
    tok = Tokenizer.from_gguf_metadata(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": ["a", "b", "Ġ"],
            "tokenizer.ggml.merges": [],
        }
    )
    pieces = [p for p, _ in tok._backend.pre_tokenizer.pre_tokenize_str("ab 12345")]
    digits = {"llama-bpe": ["123", "45"], "qwen2": list("12345"), "gpt2": ["Ġ12345"]}[pre]
    assert pieces[-len(digits) :] == digits

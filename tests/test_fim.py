"""Fill-in-the-middle prompts (engine/fim.py) on tokenizers the tests build, one per family, and
on the default model's, which has no FIM tokens."""

import pytest
from helpers import FIM_TOKENS, add_fim_tokens, save_tiny_tokenizer

from hearth.engine.catalog import load_catalog
from hearth.engine.fim import FAMILY_NAMES, detect_fim, prepended_bos
from hearth.engine.tokenizer import Tokenizer

PREFIX = "def area(r):\n    return "
SUFFIX = "\n\nprint(area(2))\n"
# What each family's prompt reads as, decoded with its special tokens.
LAYOUTS = {
    "starcoder": "<fim_prefix>{p}<fim_suffix>{s}<fim_middle>",
    "qwen": "<|fim_prefix|>{p}<|fim_suffix|>{s}<|fim_middle|>",
    "codellama": "▁<PRE>{p}▁<SUF>{s}▁<MID>",
    "deepseek": "<｜fim▁begin｜>{p}<｜fim▁hole｜>{s}<｜fim▁end｜>",
    "codestral": "[SUFFIX]{s}[PREFIX]{p}",
}


def _tokenizer(tmp_path, family: str | None) -> Tokenizer:
    path = save_tiny_tokenizer(tmp_path / (family or "plain"))
    if family is not None:
        add_fim_tokens(path, family)
    return Tokenizer.from_hf_dir(path)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prompt_layout_per_family(tmp_path, family):
    tok = _tokenizer(tmp_path, family)
    fim = detect_fim(tok, vocab_size=512)
    assert fim is not None and fim.family == family
    prefix_ids = tok.encode(PREFIX, add_special_tokens=False)
    suffix_ids = tok.encode(SUFFIX, add_special_tokens=False)
    ids = fim.prompt_ids(prefix_ids, suffix_ids)
    assert tok.decode(ids, skip_special_tokens=False) == LAYOUTS[family].format(p=PREFIX, s=SUFFIX)
    sentinels = 2 if family == "codestral" else 3
    assert len(ids) == len(prefix_ids) + len(suffix_ids) + sentinels == len(prefix_ids) + len(
        suffix_ids
    ) + fim.num_special_tokens


def test_stop_tokens_of_the_family_end_a_fill(tmp_path):
    tok = _tokenizer(tmp_path, "starcoder")
    fim = detect_fim(tok, vocab_size=512)
    assert fim.stop_token_ids == (tok.token_to_id("<file_sep>"),)
    codellama = detect_fim(_tokenizer(tmp_path, "codellama"), vocab_size=512)
    assert len(codellama.stop_token_ids) == 1  # ▁<EOT>


def test_the_default_model_has_no_fim_tokens():
    """SmolLM2's special tokens stop at <empty_output>; <fim_prefix> is six ordinary pieces."""
    from gguf import GGUFReader

    from hearth.engine.catalog import resolve_model

    tok = Tokenizer.from_gguf_metadata(GGUFReader(resolve_model(None).path))
    assert detect_fim(tok, vocab_size=tok.vocab_size) is None
    assert len(tok.encode("<fim_prefix>")) == 6
    assert tok.token_to_id("<empty_output>") is not None


def test_ids_beyond_the_embedding_do_not_count(tmp_path):
    tok = _tokenizer(tmp_path, "qwen")
    middle = tok.token_to_id("<|fim_middle|>")
    assert middle == max(tok.token_to_id(t) for t in FIM_TOKENS["qwen"][:3])
    assert detect_fim(tok, vocab_size=middle) is None  # <|fim_middle|> has no embedding row
    assert detect_fim(tok, vocab_size=middle + 1).stop_token_ids == ()  # nor <|fim_pad|>


def test_catalogue_override(tmp_path):
    tok = _tokenizer(tmp_path, "starcoder")
    assert detect_fim(tok, 512, family="none") is None
    assert detect_fim(tok, 512, family="starcoder").family == "starcoder"
    with pytest.raises(ValueError, match="lacks one of its tokens <\\|fim_prefix\\|>"):
        detect_fim(tok, 512, family="qwen")
    with pytest.raises(ValueError, match="fim must be one of"):
        detect_fim(tok, 512, family="starcoderr")
    with pytest.raises(ValueError, match="qwen models were trained on psm only"):
        detect_fim(_tokenizer(tmp_path, "qwen"), 512, order="spm")


def test_spm_puts_the_suffix_first(tmp_path):
    """StarCoder's suffix-first variant: the prefix, where typing happens, comes last."""
    tok = _tokenizer(tmp_path, "starcoder")
    fim = detect_fim(tok, 512, order="spm")
    ids = fim.prompt_ids(tok.encode(PREFIX, False), tok.encode(SUFFIX, False))
    expected = f"<fim_prefix><fim_suffix>{SUFFIX}<fim_middle>{PREFIX}"
    assert tok.decode(ids, skip_special_tokens=False) == expected


def test_bos_is_kept_where_the_tokenizer_prepends_it(tmp_path):
    path = save_tiny_tokenizer(tmp_path / "bos")
    add_fim_tokens(path, "codellama")
    config = path / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{", '{"add_bos_token": true, ', 1))
    tok = Tokenizer.from_hf_dir(path)
    assert prepended_bos(tok) == 1
    fim = detect_fim(tok, 512, bos_token_id=prepended_bos(tok))
    ids = fim.prompt_ids([10], [11])
    assert ids[:2] == [1, tok.token_to_id("▁<PRE>")] and fim.num_special_tokens == 4


def test_catalogue_checks_fim_keys(tmp_path):
    toml = tmp_path / "models.toml"
    entry = '[models.x]\nsource = "gguf"\npath = "x.gguf"\n'
    toml.write_text(entry + 'fim = "qwen"\nfim_order = "psm"\n')
    assert load_catalog(toml).models["x"].fim == "qwen"
    toml.write_text(entry + 'fim = "santa"\n')
    with pytest.raises(ValueError, match="model 'x': fim must be one of starcoder"):
        load_catalog(toml)

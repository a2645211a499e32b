"""Loaders: GGUF and safetensors tensors equal what transformers loads; bad files fail clearly."""

import json

import numpy as np
import pytest
import torch
from helpers import write_gguf

from hearth.engine.catalog import ModelSpec, ResolvedModel, resolve_model
from hearth.engine.loader import iter_hf_weights, load_gguf, load_hf_config, load_model_source
from hearth.engine.loader.gguf_loader import _unpermute

transformers = pytest.importorskip("transformers")

COMPARED_LAYERS = (0, 1, 29)


@pytest.fixture(scope="module")
def default_gguf():
    return resolve_model(None).path


@pytest.fixture(scope="module")
def gguf_model(default_gguf):
    return load_gguf(default_gguf)


@pytest.fixture(scope="module")
def transformers_state(default_gguf):
    """transformers' own GGUF load (dequantized, Q/K unpermuted), a few layers kept."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    )
    keep = ("model.embed_tokens.", "model.norm.", *(f".layers.{i}." for i in COMPARED_LAYERS))
    return {k: v.clone() for k, v in model.state_dict().items() if any(s in k for s in keep)}


def test_gguf_config_is_the_documented_shape(gguf_model):
    c = gguf_model.config
    shape = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads)
    assert shape == (30, 576, 1536, 9, 3)
    assert (c.head_dim, c.vocab_size, c.max_position_embeddings) == (64, 49152, 8192)
    assert c.architecture == "LlamaForCausalLM" and c.tie_word_embeddings
    assert c.rope_theta == 100000.0 and c.rope.kind == "default"
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert c.num_params == 134_515_008
    assert gguf_model.quantization == "Q4_1"


@pytest.mark.slow  # transformers' GGUF load takes ~13 s on 2 cores
def test_gguf_weights_equal_transformers(gguf_model, transformers_state):
    weights = dict(gguf_model.weights())
    assert len(weights) == 2 + 30 * 9 and "lm_head.weight" not in weights
    assert all(w.dtype == torch.float32 for w in weights.values())
    for name, expected in transformers_state.items():
        torch.testing.assert_close(weights[name], expected, rtol=0, atol=0, msg=name)
    assert len(transformers_state) == 2 + len(COMPARED_LAYERS) * 9


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)

    generator = torch.Generator().manual_seed(0)
    for n_head, shape in ((3, (48, 20)), (4, (32,))):
        w = torch.randn(shape, generator=generator)
        permuted = llama_cpp_permute(w, n_head).reshape(w.shape)
        assert not torch.equal(permuted, w)
        torch.testing.assert_close(_unpermute(permuted, n_head), w, rtol=0, atol=0)


def test_default_model_source(default_gguf):
    source = load_model_source(resolve_model(None))
    assert source.name == "smollm2-135m-instruct"
    assert source.max_model_len == 8192 and source.quantization == "Q4_1"
    assert source.tokenizer.encode("<|im_start|>") == [1]
    first = next(source.weights())
    assert first[0] == "model.embed_tokens.weight" and first[1].shape == (49152, 576)


# ----- HF directories -----

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _save_tiny(tmp_path, config_cls, model_cls, dtype=torch.float32, shard="50MB", **kwargs):
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **kwargs)).to(dtype)
    model.save_pretrained(tmp_path, max_shard_size=shard)
    return model


@pytest.mark.parametrize(
    "arch,kwargs,dtype",
    [
        ("Llama", dict(rope_theta=500000.0, tie_word_embeddings=False), torch.float32),
        ("Qwen2", dict(tie_word_embeddings=True), torch.bfloat16),
        ("Qwen3", dict(head_dim=32, tie_word_embeddings=True), torch.float32),
    ],
)
def test_hf_dir_config_and_weights_equal_transformers(tmp_path, arch, kwargs, dtype):
    config_cls = getattr(transformers, f"{arch}Config")
    model = _save_tiny(
        tmp_path, config_cls, getattr(transformers, f"{arch}ForCausalLM"), dtype, **kwargs
    )
    c = load_hf_config(tmp_path)
    assert c.architecture == f"{arch}ForCausalLM"
    assert (c.hidden_size, c.intermediate_size, c.num_layers) == (64, 96, 2)
    assert (c.num_heads, c.num_kv_heads, c.vocab_size) == (4, 2, 128)
    assert c.head_dim == kwargs.get("head_dim", 16)
    assert c.tie_word_embeddings == kwargs["tie_word_embeddings"]
    assert c.attention_bias == (arch == "Qwen2") and c.qk_norm == (arch == "Qwen3")
    assert c.rope_theta == kwargs.get("rope_theta", model.config.rope_parameters["rope_theta"])
    assert c.torch_dtype == str(dtype).removeprefix("torch.")
    expected = {
        k: v
        for k, v in model.state_dict().items()
        if not (c.tie_word_embeddings and k == "lm_head.weight")
    }
    loaded = dict(iter_hf_weights(tmp_path))
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == dtype
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


def test_sharded_checkpoint(tmp_path):
    model = _save_tiny(
        tmp_path, transformers.LlamaConfig, transformers.LlamaForCausalLM, shard="40KB"
    )
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = dict(iter_hf_weights(tmp_path))
    assert loaded.keys() == model.state_dict().keys()
    (sorted(tmp_path.glob("model-*.safetensors"))[-1]).unlink()
    with pytest.raises(ValueError, match="missing weight files: model-"):
        iter_hf_weights(tmp_path)


def _write_config(path, **overrides):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 128,
        **overrides,
    }
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))


def test_hf_config_variants(tmp_path):
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    }
    _write_config(
        tmp_path,
        rope_parameters=llama3,
        eos_token_id=[128001, 128008],
        max_position_embeddings=131072,
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128009, 128001]}))
    c = load_hf_config(tmp_path)
    assert c.rope_theta == 500000.0 and c.num_kv_heads == 4 and c.head_dim == 16
    assert c.rope.kind == "llama3" and c.rope.factor == 8.0
    assert c.rope.original_max_position == 8192 and c.rope.high_freq_factor == 4.0
    assert c.eos_token_ids == (128001, 128008, 128009)
    _write_config(
        tmp_path,
        architectures=["MistralForCausalLM"],
        sliding_window=4096,
        max_position_embeddings=32768,
    )
    assert load_hf_config(tmp_path).max_position_embeddings == 32768  # windowed, not capped
    _write_config(
        tmp_path,
        architectures=["Qwen2ForCausalLM"],
        sliding_window=4096,
        use_sliding_window=False,
        max_position_embeddings=32768,
    )
    assert load_hf_config(tmp_path).max_position_embeddings == 32768


def test_hf_model_source_end_to_end(tmp_path):
    model = _save_tiny(
        tmp_path,
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        tie_word_embeddings=True,
        head_dim=32,
    )
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    Backend(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>")).save(
        str(tmp_path / "tokenizer.json")
    )
    spec = ModelSpec(
        name="tiny",
        source="hf",
        path=tmp_path,
        max_model_len=64,
        chat_template="{{ messages | length }}",
    )
    source = load_model_source(ResolvedModel("tiny", "hf", tmp_path, spec))
    assert source.max_model_len == 64 and source.quantization is None
    assert source.tokenizer.apply_chat_template([{}, {}]) == "2"
    assert dict(source.weights()).keys() == model.state_dict().keys() - {"lm_head.weight"}
    wrong = ModelSpec(name="tiny", source="hf", path=tmp_path, architecture="LlamaForCausalLM")
    with pytest.raises(ValueError, match="catalogue says LlamaForCausalLM"):
        load_model_source(ResolvedModel("tiny", "hf", tmp_path, wrong))


# ----- bad input -----


def test_missing_dir_and_missing_config(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_hf_config(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no config.json"):
        iter_hf_weights(tmp_path)


def test_unsupported_architecture_and_missing_keys(tmp_path):
    _write_config(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="lacks the key"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_hf_config(tmp_path)


def test_no_safetensors_and_truncated_safetensors(tmp_path):
    _write_config(tmp_path)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        iter_hf_weights(tmp_path)
    _save_tiny(tmp_path, transformers.LlamaConfig, transformers.LlamaForCausalLM)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors"):
        iter_hf_weights(tmp_path)


def test_bad_gguf_files(tmp_path, default_gguf):
    with pytest.raises(ValueError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(fake)
    truncated = tmp_path / "truncated.gguf"
    with default_gguf.open("rb") as f:
        truncated.write_bytes(f.read(100_000))  # ends inside the vocabulary
    with pytest.raises(ValueError, match="may be truncated"):
        load_gguf(truncated)


def test_gguf_tensor_names_and_dtypes_are_float32_copies(gguf_model):
    name, tensor = next(gguf_model.weights())
    assert tensor.dtype == torch.float32 and tensor.is_contiguous()
    tensor.add_(1.0)  # writable: not a view of the read-only memory map
    assert np.isfinite(tensor.numpy()).all()


# ----- GGUF written the way llama.cpp's converter writes it -----

@pytest.mark.parametrize(
    "arch,config_cls,model_cls,kwargs",
    [
        ("llama", "LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
        ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    ],
)
def test_gguf_roundtrip_gives_the_hf_tensors(tmp_path, arch, config_cls, model_cls, kwargs):
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**TINY, **kwargs)
    model = getattr(transformers, model_cls)(config)
    write_gguf(tmp_path / "tiny.gguf", arch, model)
    loaded = load_gguf(tmp_path / "tiny.gguf")
    assert loaded.config.architecture == model_cls
    assert loaded.config.head_dim == config.head_dim
    assert loaded.config.tie_word_embeddings == config.tie_word_embeddings
    assert loaded.config.qk_norm == (arch == "qwen3")
    weights = dict(loaded.weights())
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0, msg=name)

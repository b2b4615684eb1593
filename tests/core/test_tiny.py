"""Tests for trinity_core.fixtures.tiny: the offline Gemma-3 tokenizer and the tiny random Gemma-3 model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trinity_core.fixtures import tiny

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "def f(x):\n    return x * 2\n\tindented with a tab",
    "Numbers 12345 and 3.14159; symbols #@%^&*()[]{}",
    "café naïve Zürich — “quotes” 日本語 😀",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6."},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


# ------------------------------------------------------------------ (a) tokenizer


def test_special_tokens_have_gemma_ids(tokenizer) -> None:
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<eos>", 1)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<bos>", 2)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 3)
    assert len(tokenizer) == tiny.TOKENIZER_VOCAB_SIZE
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length >= 100_000


def test_turn_tokens_encode_to_single_ids(tokenizer) -> None:
    sot, eot = tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    assert tokenizer.encode("<start_of_turn>", add_special_tokens=False) == [sot]
    assert tokenizer.encode("<end_of_turn>", add_special_tokens=False) == [eot]
    ids = tokenizer.encode("x<start_of_turn>user\nhi<end_of_turn>\n", add_special_tokens=False)
    assert ids.count(sot) == 1 and ids.count(eot) == 1
    assert tokenizer.unk_token_id not in ids


def test_adds_bos_by_default(tokenizer) -> None:
    ids = tokenizer("Hello").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[1:] == tokenizer.encode("Hello", add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_text_round_trips(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids  # byte fallback: nothing is unknown
    assert tokenizer.decode(ids) == text


def test_hf_tokenizer_matches_sentencepiece_model(tiny_dir: Path, tokenizer) -> None:
    """The HF tokenizer and the bundled tokenizer.model (read by llama.cpp) must agree."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))
    assert sp.get_piece_size() == len(tokenizer)
    corpus_lines = tiny.CORPUS_PATH.read_text(encoding="utf-8").splitlines()[:200]
    for text in TEXTS + corpus_lines + ["<start_of_turn>model\nHi<end_of_turn>\n"]:
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text), text


# ------------------------------------------------------------------ (b) chat template


def test_chat_template_renders_gemma3_format(tokenizer) -> None:
    rendered = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert rendered == (
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2 + 2?<end_of_turn>\n"
        "<start_of_turn>model\n4.<end_of_turn>\n"
    )
    prompt = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n"


def test_chat_template_is_prefix_consistent(tokenizer) -> None:
    for k, message in enumerate(CONVERSATION):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(CONVERSATION[:k], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(CONVERSATION[: k + 1], tokenize=False)
        assert full.startswith(prompt)
        assert full[len(prompt) :] == message["content"] + "<end_of_turn>\n"
        # and at token level, which is what the loss mask is built from
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        full_ids = tokenizer.encode(full, add_special_tokens=False)
        assert full_ids[: len(prompt_ids)] == prompt_ids


def test_chat_template_rejects_non_alternating_roles(tokenizer) -> None:
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )


# ------------------------------------------------------------------ (c) determinism + caching


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_build_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = _files(tiny.build_tiny_model(tmp_path / "again"))
    first = _files(tiny_dir)
    assert set(first) >= {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        tiny.MARKER_FILE,
    }
    assert again == first  # byte-identical, every file

    other_seed = _files(tiny.build_tiny_model(tmp_path / "seed1", seed=1))
    assert other_seed["model.safetensors"] != first["model.safetensors"]
    assert other_seed["tokenizer.json"] == first["tokenizer.json"]


def test_second_build_is_a_noop_and_foreign_dirs_are_kept(tiny_dir: Path, tmp_path: Path) -> None:
    weights = tiny_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert tiny.build_tiny_model(tiny_dir) == tiny_dir
    assert weights.stat().st_mtime_ns == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        tiny.build_tiny_model(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_other_params_replace_a_stale_tiny_model(tmp_path: Path) -> None:
    out = tiny.build_tiny_model(tmp_path / "m", num_hidden_layers=1)
    out = tiny.build_tiny_model(out, num_hidden_layers=2)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_max_shard_size_makes_a_sharded_checkpoint(tmp_path: Path) -> None:
    out = tiny.build_tiny_model(tmp_path / "sharded", max_shard_size="4MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (out / "model.safetensors").exists()


# ------------------------------------------------------------------ (d) llama.cpp metadata


def test_tokenizer_config_has_added_tokens_decoder(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    by_content = {entry["content"]: (int(token_id), entry) for token_id, entry in decoder.items()}
    expected_ids = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": None, "<end_of_turn>": None}
    for content, token_id in expected_ids.items():
        assert content in by_content, content
        found_id, entry = by_content[content]
        assert entry["special"] is True
        if token_id is not None:
            assert found_id == token_id
    assert (tiny_dir / "tokenizer.model").is_file()


def test_config_and_generation_config(tiny_dir: Path, tokenizer) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["vocab_size"] == len(tokenizer)
    assert config["query_pre_attn_scalar"] == config["head_dim"] == 64
    assert config["tie_word_embeddings"] is True
    assert config["layer_types"].count("full_attention") == 1
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, tokenizer.convert_tokens_to_ids("<end_of_turn>")]


# ------------------------------------------------------------------ (e) 4-bit load + forward


def test_loads_in_4bit_on_cpu_and_runs_forward(tiny_dir: Path, tokenizer) -> None:
    import torch
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=quant)
    linear4 = [name for name, module in model.named_modules() if isinstance(module, Linear4bit)]
    assert len(linear4) == 6 * 7  # q, k, v, o, gate, up, down in each of the 6 layers

    ids = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=True, return_dict=True)["input_ids"]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()

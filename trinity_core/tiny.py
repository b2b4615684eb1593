"""A tiny, randomly initialised, *real* Gemma-3 text model with an offline tokenizer.

Nothing can be downloaded in tests or CI, so the project builds its own stand-in for
``google/gemma-3-*-it``: the same architecture (``Gemma3ForCausalLM``, sliding/full attention
mix, tied embeddings), a SentencePiece BPE tokenizer trained on a bundled corpus with the Gemma
special-token layout, and the real Gemma-3 chat template. Everything is deterministic: the same
parameters and seed give byte-identical files.

Public API:

* :data:`TINY_CONFIG` - default ``Gemma3TextConfig`` kwargs (``vocab_size`` comes from the tokenizer).
* :func:`build_tokenizer` - train + save the tokenizer.
* :func:`build_tiny_model` - tokenizer + random model, written atomically, cached by a marker file.
* :func:`write_added_tokens_decoder` - transformers-5 fix-up that llama.cpp's converter needs.
* :func:`gemma3_chat_template` - the bundled chat template text.

Token ids follow Gemma: ``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, ``<mask>``=4, then
``<start_of_turn>``=5 and ``<end_of_turn>``=6 (Gemma itself uses 105/106; only the names matter).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay lazy: importing this module must be cheap
    from transformers import PreTrainedTokenizerFast

ASSETS_DIR = Path(__file__).parent / "assets"
CORPUS_PATH = ASSETS_DIR / "tiny_corpus.txt"
CHAT_TEMPLATE_PATH = ASSETS_DIR / "gemma3_chat_template.jinja"

MARKER_FILE = "trinity_tiny.json"
"""Written last into a finished tiny-model directory; records the build parameters."""

MARKER_FORMAT = 1
"""Bump when the build changes in a way that makes old directories stale."""

TOKENIZER_VOCAB_SIZE = 1024

PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
TURN_TOKENS = (START_OF_TURN, END_OF_TURN)
IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")

TINY_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "hidden_size": 256,
        "head_dim": 64,
        "intermediate_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": 16,
        "query_pre_attn_scalar": 64,  # = head_dim, as in the real small Gemma-3 models
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "dtype": "float32",
        # layer_types left to HF's default: 5 sliding : 1 full.
    }
)
"""Default ``Gemma3TextConfig`` kwargs for the tiny model (``vocab_size`` and token ids are added at build)."""


def gemma3_chat_template() -> str:
    """Return the bundled Gemma-3 chat template (text-only variant of the official one)."""
    return CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- tokenizer


def _train_sentencepiece(corpus: Path, vocab_size: int, seed: int, symbols: tuple[str, ...] = TURN_TOKENS) -> bytes:
    """Train a byte-fallback SentencePiece BPE model on ``corpus``; return the serialized proto.

    ``symbols`` are pieces that always encode to one id each, right after ``<mask>`` (Gemma keeps
    its turn and image markers in the SentencePiece vocabulary too).

    Training reads sentences from an iterator and writes to memory, so no file path ends up in the
    proto's ``trainer_spec``; with one thread and no shuffling the result is byte-reproducible.
    """
    import sentencepiece as spm

    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece=PAD,
        eos_piece=EOS,
        bos_piece=BOS,
        unk_piece=UNK,
        control_symbols=[MASK],
        user_defined_symbols=list(symbols),  # matched in raw text -> always one id each
        byte_fallback=True,  # any text encodes, nothing becomes <unk>
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",  # lossless: decode(encode(s)) == s
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return buf.getvalue()


def write_added_tokens_decoder(tokenizer: PreTrainedTokenizerFast, out_dir: str | os.PathLike[str]) -> None:
    """Add ``added_tokens_decoder`` to ``out_dir/tokenizer_config.json`` (call after ``save_pretrained``).

    transformers 5 no longer writes this mapping (it lives only in ``tokenizer.json``), but
    llama.cpp's ``convert_hf_to_gguf`` reads it from ``tokenizer_config.json`` to mark tokens such
    as ``<start_of_turn>``/``<end_of_turn>`` as CONTROL; without it they become normal text tokens
    and generation never stops on ``<end_of_turn>``. Idempotent; keeps every other key.
    """
    path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(token_id): {
            "content": tok.content,
            "lstrip": tok.lstrip,
            "normalized": tok.normalized,
            "rstrip": tok.rstrip,
            "single_word": tok.single_word,
            "special": tok.special,
        }
        for token_id, tok in sorted(tokenizer.added_tokens_decoder.items())
    }
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tokenizer(
    out_dir: str | os.PathLike[str],
    *,
    corpus: str | os.PathLike[str] | None = None,
    vocab_size: int = TOKENIZER_VOCAB_SIZE,
    seed: int = 0,
    image_tokens: bool = False,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train the Gemma-style tokenizer offline and save it (HF files + ``tokenizer.model``) to ``out_dir``.

    The result is a ``GemmaTokenizer`` (tokenizers backend) with bos/eos/pad/unk/mask at Gemma ids,
    ``<start_of_turn>``/``<end_of_turn>`` as special single-id tokens, the Gemma-3 chat template,
    ``add_bos_token=True``, right padding and a large ``model_max_length``. ``len(tokenizer)`` equals
    ``vocab_size`` (no tokens are added beyond the SentencePiece vocabulary).

    ``image_tokens=True`` lays the tokenizer out as Gemma-3's multimodal one: ``<start_of_image>`` and
    ``<end_of_image>`` in the SentencePiece vocabulary (Gemma: 255999, 256000), ``<image_soft_token>``
    added right after it (Gemma: 262144 = its SentencePiece size; here ``vocab_size``), all three named
    as the tokenizer's ``boi_token``/``eoi_token``/``image_token``; ``len(tokenizer)`` is then
    ``vocab_size + 1``. ``chat_template`` replaces the bundled text-only template.
    """
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm_path = out / "tokenizer.model"  # kept: llama.cpp's gemma3 converter prefers it
    symbols = TURN_TOKENS + (IMAGE_TOKENS[:2] if image_tokens else ())
    spm_path.write_bytes(_train_sentencepiece(Path(corpus) if corpus else CORPUS_PATH, vocab_size, seed, symbols))

    # vocab + merges exactly as transformers would extract them from the .model file
    native = GemmaTokenizer.convert_to_native_format(vocab_file=str(spm_path))
    special = [AddedToken(t, normalized=False, special=True) for t in symbols]
    extra: dict[str, Any] = {}
    if image_tokens:
        special.append(AddedToken(IMAGE_TOKENS[2], normalized=False, special=True))
        extra = dict(zip(("boi_token", "eoi_token", "image_token"), IMAGE_TOKENS, strict=True))
    tokenizer = GemmaTokenizer(
        vocab=native["vocab"],
        merges=native["merges"],
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        mask_token=MASK,
        additional_special_tokens=special,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        model_max_length=1_000_000,
        chat_template=chat_template or gemma3_chat_template(),
        **extra,
    )
    if len(tokenizer) != vocab_size + image_tokens:  # would desync config.vocab_size and tokenizer.model
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {vocab_size + image_tokens}")
    tokenizer.save_pretrained(out)
    write_added_tokens_decoder(tokenizer, out)
    return tokenizer


# --------------------------------------------------------------------------- model


def _assets_digest() -> str:
    """sha256 over the bundled corpus and chat template: editing either invalidates cached builds."""
    h = hashlib.sha256()
    for path in (CORPUS_PATH, CHAT_TEMPLATE_PATH):
        h.update(path.read_bytes())
    return h.hexdigest()


def _is_complete(path: Path, marker: Mapping[str, Any]) -> bool:
    """True if ``path`` is a finished tiny model built with exactly ``marker``'s parameters."""
    try:
        found = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return found == marker and (path / "config.json").is_file()


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_hidden_layers: int = TINY_CONFIG["num_hidden_layers"],
    hidden_size: int = TINY_CONFIG["hidden_size"],
    intermediate_size: int = TINY_CONFIG["intermediate_size"],
    num_attention_heads: int = TINY_CONFIG["num_attention_heads"],
    num_key_value_heads: int = TINY_CONFIG["num_key_value_heads"],
    head_dim: int = TINY_CONFIG["head_dim"],
    sliding_window: int = TINY_CONFIG["sliding_window"],
    max_position_embeddings: int = TINY_CONFIG["max_position_embeddings"],
    max_shard_size: str | int | None = None,
) -> Path:
    """Build (or reuse) the tiny Gemma-3 model + tokenizer in ``out_dir``; return it as an absolute Path.

    The model is ``Gemma3ForCausalLM`` initialised under ``torch.manual_seed(seed)`` (the caller's
    RNG state is left untouched) and saved as float32 safetensors, with the tokenizer
    (:func:`build_tokenizer`) beside it and a ``generation_config.json`` that stops on ``<eos>`` or
    ``<end_of_turn>``. ``query_pre_attn_scalar`` follows ``head_dim``. ``max_shard_size`` (e.g.
    ``"2MB"``) produces a sharded checkpoint.

    The directory is built next to ``out_dir``, marked with ``trinity_tiny.json`` (config, seed,
    shard size, assets digest) and renamed into place. A call whose parameters match the marker
    is a no-op. A previous tiny model with other parameters, or an empty directory, is replaced;
    any other existing path raises ``FileExistsError``.
    """
    out = Path(out_dir).absolute()
    config_kwargs: dict[str, Any] = {
        **TINY_CONFIG,
        "num_hidden_layers": num_hidden_layers,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": sliding_window,
        "max_position_embeddings": max_position_embeddings,
    }
    marker: dict[str, Any] = {
        "format": MARKER_FORMAT,
        "seed": seed,
        "config": config_kwargs,
        "tokenizer_vocab_size": TOKENIZER_VOCAB_SIZE,
        "max_shard_size": max_shard_size,
        "assets_sha256": _assets_digest(),
    }
    if _is_complete(out, marker):
        return out
    if out.exists() and not (out.is_dir() and ((out / MARKER_FILE).is_file() or not any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not a Trinity tiny model; refusing to overwrite it")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the result is a normal, shareable directory
    try:
        _build_into(tmp, seed=seed, config_kwargs=config_kwargs, max_shard_size=max_shard_size)
        for file in tmp.iterdir():
            file.chmod(0o644)  # safetensors are written 0600; other users (workers) must read them
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _move_into_place(tmp, out, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build_into(path: Path, *, seed: int, config_kwargs: Mapping[str, Any], max_shard_size: str | int | None) -> None:
    """Write tokenizer, config, generation config and weights into ``path``."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig

    tokenizer = build_tokenizer(path, vocab_size=TOKENIZER_VOCAB_SIZE)
    config = Gemma3TextConfig(
        **config_kwargs,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)],
        pad_token_id=tokenizer.pad_token_id,
    )
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **save_kwargs)


def _move_into_place(tmp: Path, out: Path, marker: Mapping[str, Any]) -> None:
    """Rename the finished ``tmp`` to ``out``, replacing a stale tiny model or an empty directory.

    If another process finished the same build first, its directory is kept.
    """
    if out.exists():
        if _is_complete(out, marker):
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)  # a stale tiny model or an empty dir (checked by the caller)
        try:
            tmp.rename(out)
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        tmp.rename(out)
    except OSError:
        if not _is_complete(out, marker):  # lost a race to a build with other parameters
            raise

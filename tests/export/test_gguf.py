"""The GGUF files load in llama.cpp and match the merged HF model; the Modelfile prompts like HF."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.export.export_helpers import FIDELITY, hf_greedy, hf_logits
from trinity_core.errors import ExportError
from trinity_core.export.gguf import CONTROL, GEMMA3_TEMPLATE, check_gguf, convert_to_gguf, inspect_gguf, quantize_gguf

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of Peru?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Name a red fruit."}],
    [{"role": "user", "content": "Say hello to Dee."}, {"role": "assistant", "content": "Hello, Dee!"},
     {"role": "user", "content": "And goodbye?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
]


@pytest.fixture(scope="module")
def gguf_paths(exported, workdir):
    result, _ = exported
    return {q: workdir / p for q, p in result["gguf"].items()}


@pytest.fixture(scope="module")
def llama(gguf_paths):
    """``llama(qtype)``: that GGUF loaded in llama.cpp (once per module, closed at the end)."""
    from llama_cpp import Llama

    loaded = {}

    def get(qtype):
        if qtype not in loaded:
            loaded[qtype] = Llama(model_path=str(gguf_paths[qtype]), logits_all=True, n_ctx=256, n_batch=256,
                                  verbose=False)
        return loaded[qtype]

    yield get
    for llm in loaded.values():
        llm.close()


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def test_files_and_types(gguf_paths, exported):
    result, events = exported
    assert set(gguf_paths) == {"f16", "q4_k_m", "q8_0"}
    f16, q4, q8 = (inspect_gguf(gguf_paths[q]) for q in ("f16", "q4_k_m", "q8_0"))
    assert f16["architecture"] == q4["architecture"] == "gemma3"
    assert (f16["file_type"], q4["file_type"], q8["file_type"]) == (1, 15, 7)
    assert set(f16["matrix_types"]) == {"F16"}
    assert set(q4["matrix_types"]) == {"Q4_K", "Q6_K"} and q4["matrix_types"]["Q4_K"] > q4["matrix_types"]["Q6_K"]
    assert set(q8["matrix_types"]) == {"Q8_0"}
    assert q4["size"] < f16["size"] / 3
    assert [e["gguf"] for e in events if "gguf" in e] == ["f16", "q4_k_m", "q8_0"]


def test_turn_markers_are_control_tokens(gguf_paths, tokenizer):
    for path in gguf_paths.values():
        turn = inspect_gguf(path)["turn_tokens"]
        for token in ("<start_of_turn>", "<end_of_turn>"):
            assert turn[token] == {"id": tokenizer.convert_tokens_to_ids(token), "type": CONTROL}, path.name


def test_llama_cpp_tokenizes_chat_text_like_hf(llama, tokenizer):
    llm = llama("q4_k_m")
    for messages in CONVERSATIONS:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        hf = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.removeprefix("<bos>").encode(), add_bos=True, special=True) == hf
    for marker in ("<start_of_turn>", "<end_of_turn>"):  # one token each, the HF id
        assert llm.tokenize(marker.encode(), add_bos=False, special=True) == [tokenizer.convert_tokens_to_ids(marker)]


def test_f16_matches_the_merged_model(llama, merged_model, probe_ids):
    llm = llama("f16")
    hf = hf_logits(merged_model, probe_ids).numpy()
    FIDELITY["gguf_f16_max_abs"] = diff = float(np.abs(llama_logits(llm, probe_ids) - hf).max())
    assert diff < 0.01
    assert llama_greedy(llm, probe_ids, 8) == hf_greedy(merged_model, probe_ids, 8)


def test_q4_k_m_loads_and_generates(llama, merged_model, probe_ids, tokenizer):
    """The random tiny model's logits are nearly flat (std ~0.3), so 4-bit noise flips the arg-max
    of about half the positions; where the HF model has a clear favourite the q4 file agrees."""
    llm = llama("q4_k_m")
    q4 = llama_logits(llm, probe_ids)
    hf = hf_logits(merged_model, probe_ids).numpy()
    top2 = np.sort(hf, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.2
    agree = q4.argmax(-1) == hf.argmax(-1)
    FIDELITY["gguf_q4_k_m_max_abs"] = float(np.abs(q4 - hf).max())
    FIDELITY["gguf_q4_k_m_top1"] = float(agree.mean())
    FIDELITY["gguf_q4_k_m_top1_clear"] = float(agree[clear].mean())
    FIDELITY["gguf_q4_k_m_corr"] = corr = float(np.corrcoef(q4.ravel(), hf.ravel())[0, 1])
    assert corr > 0.9
    assert clear.sum() >= 3 and agree[clear].mean() >= 0.9
    reply = llm.create_completion(tokenizer.apply_chat_template(
        CONVERSATIONS[0], tokenize=False, add_generation_prompt=True).removeprefix("<bos>"),
        max_tokens=8, temperature=0.0)
    assert reply["usage"]["completion_tokens"] >= 1


def test_check_gguf_refuses_the_wrong_file(gguf_paths):
    with pytest.raises(ExportError, match="file type 1, expected 15"):
        check_gguf(gguf_paths["f16"], "q4_k_m")
    with pytest.raises(ExportError, match="architecture"):
        check_gguf(gguf_paths["f16"], "f16", architecture="llama")


def test_converter_failure_is_an_export_error(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModel"]}')
    with pytest.raises(ExportError, match="GGUF conversion failed"):
        convert_to_gguf(tmp_path, tmp_path / "out" / "model-f16.gguf")
    assert not list((tmp_path / "out").iterdir())


def test_quantize_failure_is_an_export_error(tmp_path, capfd):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ExportError, match="could not quantize .*bad.gguf to q4_k_m"):
        quantize_gguf(tmp_path / "bad.gguf", tmp_path / "out" / "model-q4_k_m.gguf", "q4_k_m")
    assert not list((tmp_path / "out").iterdir())
    assert "magic" not in capfd.readouterr().err  # llama.cpp's log is kept off the console


# ------------------------------------------------------------------- Modelfile


def test_modelfile(workdir, exported, export_spec):
    result, _ = exported
    text = (workdir / result["modelfile"]).read_text()
    assert result["modelfile"] == "gguf/Modelfile"
    assert text.startswith("FROM ./model-q4_k_m.gguf\n")
    assert f'TEMPLATE """{GEMMA3_TEMPLATE}"""' in text
    for line in ('PARAMETER stop "<end_of_turn>"', "PARAMETER temperature 1.0", "PARAMETER top_p 0.95",
                 "PARAMETER top_k 64", f"PARAMETER num_ctx {export_spec.model.max_seq_length}"):
        assert line in text.splitlines()


def test_modelfile_stops_on_the_trained_terminator(workdir, exported, tokenizer):
    """Ollama stops where training taught the model to: the stop token is the chat template's turn
    terminator (what the label audit checks is trained), and the template closes each turn with it."""
    from trinity_core.data.label_audit import turn_terminator

    token = turn_terminator(tokenizer).token
    text = (workdir / exported[0]["modelfile"]).read_text()
    assert f'PARAMETER stop "{token}"' in text.splitlines() and token in GEMMA3_TEMPLATE


# Ollama renders TEMPLATE with Go's text/template. To check it without Go, each action of the
# template is mapped to its Jinja equivalent (the table below; `{{-`/`-}}` trim whitespace the
# same way in both) and the result is rendered by jinja2; the literal text between the actions,
# which is what decides the token ids, is kept byte for byte. The data are what Ollama passes:
# .Messages (the system message stays in the list) and .System (the system messages joined).
GO_TO_JINJA = [
    (r"\$first := true", "{%{l} set ns = namespace(first=true) %}"),
    (r"range \$i, \$_ := \.Messages", "{%{l} for m in messages %}"),
    (r"\$last := eq \(len \(slice \$\.Messages \$i\)\) 1", "{%{l} set last = loop.last %}"),
    (r'if eq \.Role "user"', '{%{l} if m.role == "user" %}'),
    (r'else if eq \.Role "assistant"', '{%{l} elif m.role == "assistant" %}'),
    (r"if and \$first \$\.System", "{%{l} if ns.first and system %}"),
    (r"\$\.System", "{{{l} system }}"),
    (r"\.Content", "{{{l} m.content }}"),
    (r"if \$last", "{%{l} if last %}"),
    (r"if not \$last", "{%{l} if not last %}"),
    (r"\$first = false", "{%{l} set ns.first = false %}"),
]


def render_go_template(template: str, messages: list[dict[str, str]]) -> str:
    import jinja2

    blocks: list[str] = []

    def action(match: re.Match) -> str:
        left, body = match.group(1) or "", match.group(2).strip()
        if body == "end":
            return "{%" + left + (" endfor" if blocks.pop() == "for" else " endif") + " %}"
        for pattern, jinja in GO_TO_JINJA:
            if re.fullmatch(pattern, body):
                if body.startswith(("if", "range")):
                    blocks.append("for" if body.startswith("range") else "if")
                return jinja.replace("{l}", left)
        raise AssertionError(f"no Jinja mapping for Go action {body!r}")

    source = re.sub(r"\{\{(-?)(.*?)\}\}", action, template)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    env = jinja2.Environment(keep_trailing_newline=True)
    return env.from_string(source).render(messages=messages, system=system)


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "system", "multi-turn", "system-multi-turn"])
def test_modelfile_template_prompts_like_the_hf_chat_template(messages, tokenizer):
    ollama_text = render_go_template(GEMMA3_TEMPLATE, messages)
    hf_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<bos>" + ollama_text == hf_text  # Ollama/llama.cpp add <bos> (add_bos_token)
    ollama_ids = tokenizer(ollama_text, add_special_tokens=True)["input_ids"]
    assert ollama_ids == tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                       return_dict=False)

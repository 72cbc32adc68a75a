"""Model sources: ollama's store and the Hugging Face cache, built for real in a temporary folder.

The ollama store holds the demo GGUF (hard-linked, digests computed as ollama computes them) with system,
params, template and license layers; the HF cache holds a tiny random Qwen3 as symlinks into blobs/. Each is
run and compared with loading the same file directly.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from model_stores import add_blob, known_digest, make_hf_repo, make_ollama_model, tree_state, write_llama_gguf
from tiny_models import build_tiny

from qwen_engine import LLM, ModelLoadError, SamplingParams
from qwen_engine.weights import ollama
from qwen_engine.weights.demo import DEMO_SHA256
from qwen_engine.weights.sources import resolve_source

SYSTEM = "You are Captain Byte, a pirate who answers in one line."
PARAMS = {"temperature": 0.3, "top_k": 12, "top_p": 0.7, "repeat_penalty": 1.1, "stop": ["<|im_end|>", "Arr"],
          "num_ctx": 1024, "num_predict": 6, "seed": 42, "mirostat": 2, "repeat_last_n": 32}
GO_TEMPLATE = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ .Prompt }}"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.0)
TINY_ID = "Tiny/Qwen3-Tiny"


@pytest.fixture(scope="module")
def stores(tmp_path_factory, demo_gguf, qwen3_tokenizer_dir):
    """The store folders and the environment pointing at them; on teardown, proof that none was written."""
    base = tmp_path_factory.mktemp("stores")
    ollama_root, hf_cache, home = base / "ollama", base / "hf", base / "home"
    home.mkdir()
    known_digest(demo_gguf, DEMO_SHA256)  # checked when the demo was assembled; the loader checks it again
    make_ollama_model(ollama_root, "qwen2.5-coder", "0.5b", gguf=demo_gguf, system=SYSTEM, params=PARAMS,
                      template=GO_TEMPLATE, license="Apache 2.0")
    tiny = base / "tiny"
    build_tiny("qwen3", tiny, tokenizer_dir=qwen3_tokenizer_dir)
    snapshot = make_hf_repo(hf_cache, TINY_ID, tiny)
    env = {"OLLAMA_MODELS": str(ollama_root), "HF_HUB_CACHE": str(hf_cache), "QWEN_ENGINE_HOME": str(home)}
    before = tree_state(ollama_root, hf_cache)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield {"ollama": ollama_root, "hf": hf_cache, "home": home, "tiny": tiny, "snapshot": snapshot, "env": env,
               "pristine": before}
    assert tree_state(ollama_root, hf_cache) == before, "something was written into the ollama or HF folders"


@pytest.fixture(scope="module")
def ollama_llm(stores):
    return LLM("ollama:qwen2.5-coder:0.5b", progress=False)


@pytest.fixture(scope="module")
def hf_llm(stores):
    return LLM(TINY_ID, progress=False)


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """An empty ollama store and HF cache of its own, for the bad-input tests."""
    root, cache, home = tmp_path / "ollama", tmp_path / "hf", tmp_path / "home"
    for folder in (root, cache, home):
        folder.mkdir()
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("QWEN_ENGINE_HOME", str(home))
    return tmp_path


def load_error(model: str) -> str:
    from qwen_engine.weights.loader import load_model

    with pytest.raises(ModelLoadError) as info:
        load_model(model, progress=False)
    return str(info.value)


# -- names -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("qwen2.5", ("registry.ollama.ai", "library", "qwen2.5", "latest")),
        ("qwen2.5:0.5b", ("registry.ollama.ai", "library", "qwen2.5", "0.5b")),
        ("someone/my-qwen:q8_0", ("registry.ollama.ai", "someone", "my-qwen", "q8_0")),
        ("hf.co/Qwen/Qwen2.5-GGUF:Q4_K_M", ("hf.co", "Qwen", "Qwen2.5-GGUF", "Q4_K_M")),
        ("localhost:5000/team/qwen:v1", ("localhost:5000", "team", "qwen", "v1")),
    ],
)
def test_ollama_names(text, expected):
    name = ollama.parse_name(text)
    assert (name.host, name.namespace, name.model, name.tag) == expected


@pytest.mark.parametrize("text", ["../../etc/passwd", "qwen:..", "a/b/c/d", "qwen:", "", "qwen/../x"])
def test_bad_ollama_names(text):
    with pytest.raises(ModelLoadError, match="not a valid ollama model name"):
        ollama.parse_name(text)


def test_unknown_name_form_lists_the_accepted_ones(scratch):
    message = load_error("just-a-word")
    assert "ollama:NAME[:TAG]" in message and "ORG/NAME[@REVISION]" in message and "GGUF file" in message


def test_an_existing_path_wins_over_a_repo_id(scratch, monkeypatch):
    (scratch / "Tiny" / "Qwen3-Tiny").mkdir(parents=True)
    monkeypatch.chdir(scratch)
    source = resolve_source(TINY_ID)
    assert source.kind == "path" and source.path == Path(TINY_ID)


# -- ollama ----------------------------------------------------------------------------------------------


def test_ollama_generation_matches_the_file(ollama_llm, demo_llm, demo_gguf):
    assert ollama_llm.path.samefile(demo_gguf)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
    direct = demo_llm.chat(messages, GREEDY)
    via_store = ollama_llm.chat(messages, GREEDY)
    assert via_store.token_ids == direct.token_ids and len(direct.token_ids) > 0
    assert ollama_llm.apply_chat_template(messages) == demo_llm.apply_chat_template(messages)


def test_ollama_system_and_params_become_defaults(ollama_llm, demo_llm):
    user = [{"role": "user", "content": "Hi"}]
    prompt = ollama_llm.apply_chat_template(user)
    assert SYSTEM in prompt and "Alibaba" not in prompt  # replaces the template's built-in system message
    assert prompt == demo_llm.apply_chat_template([{"role": "system", "content": SYSTEM}, *user])
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert SYSTEM not in ollama_llm.apply_chat_template(own)
    d = ollama_llm.default_params
    assert (d.temperature, d.top_k, d.top_p, d.repetition_penalty) == (0.3, 12, 0.7, 1.1)
    assert (d.stop, d.max_tokens, d.seed) == (["<|im_end|>", "Arr"], 6, 42)
    assert d.min_p is None  # not in the params layer: the model's own default stays
    assert ollama_llm.max_model_len == 1024
    assert demo_llm.max_model_len == 32768
    assert ollama_llm.source.template == GO_TEMPLATE and ollama_llm.source.name == "ollama:qwen2.5-coder:0.5b"
    # The defaults reach generation: no max_tokens given, num_predict's 6 applies.
    out = ollama_llm.chat(user, SamplingParams(temperature=0.0))
    assert out.usage.completion_tokens <= 6


def test_unknown_params_are_named_in_one_warning(stores, caplog):
    with caplog.at_level(logging.WARNING, logger="qwen_engine"):
        resolve_source("ollama:qwen2.5-coder:0.5b", progress=False)
    warnings = [r.getMessage() for r in caplog.records if "no equivalent" in r.getMessage()]
    assert len(warnings) == 1 and "mirostat, repeat_last_n" in warnings[0]


def test_param_mapping():
    params, num_ctx = ollama.map_params({"num_predict": -1, "seed": -1, "stop": "END", "min_p": 0.05,
                                        "presence_penalty": 0.5, "frequency_penalty": 0.25}, "x")
    assert (params.max_tokens, params.seed, params.stop, params.min_p) == (None, None, ["END"], 0.05)
    assert (params.presence_penalty, params.frequency_penalty, num_ctx) == (0.5, 0.25, None)


def test_out_of_range_params_are_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="qwen_engine"):
        params, num_ctx = ollama.map_params({"top_p": 0, "temperature": "hot", "num_ctx": -5, "top_k": 5}, "x")
    assert (params.top_p, params.temperature, params.top_k, num_ctx) == (None, None, 5, None)
    assert "top_p=0" in caplog.text and "temperature='hot'" in caplog.text and "num_ctx=-5" in caplog.text


def test_verification_is_stamped_in_our_cache(stores, monkeypatch):
    resolve_source("ollama:qwen2.5-coder:0.5b", progress=False)
    stamps = list((stores["home"] / "verified" / "ollama").iterdir())
    assert len(stamps) == 1  # the GGUF only; small blobs are hashed each time instead
    big = ollama._sha256
    monkeypatch.setattr(ollama, "_sha256", lambda path, size, *a: pytest.fail(f"re-hashed {path}")
                        if size > 1 << 20 else big(path, size, *a))
    resolve_source("ollama:qwen2.5-coder:0.5b", progress=False)


def test_nothing_is_written_into_the_stores(stores, ollama_llm, hf_llm):
    # Both models were loaded from the stores by the fixtures (blobs verified, stamps written); resolve and
    # list once more, then compare with the stores as they were built, names, sizes and mtimes.
    resolve_source("ollama:qwen2.5-coder:0.5b", progress=False)
    resolve_source(TINY_ID)
    from qwen_engine.weights.catalog import list_models

    assert {e.name for e in list_models()} >= {"ollama:qwen2.5-coder:0.5b", TINY_ID}
    assert tree_state(stores["ollama"], stores["hf"]) == stores["pristine"]


# -- ollama: bad input -----------------------------------------------------------------------------------


def test_manifest_not_json(scratch):
    manifest = make_ollama_model(scratch / "ollama", "broken", gguf=b"GGUF")
    manifest.write_text("{not json")
    message = load_error("ollama:broken")
    assert str(manifest) in message and "not valid JSON" in message


def test_missing_blob(scratch):
    make_ollama_model(scratch / "ollama", "gone", gguf=b"GGUF....", system="hi")
    blob = next(p for p in (scratch / "ollama" / "blobs").iterdir() if p.read_bytes() == b"hi")
    blob.unlink()
    message = load_error("ollama:gone")
    assert str(blob) in message and "is missing" in message


def test_digest_mismatch(scratch):
    manifest = make_ollama_model(scratch / "ollama", "tampered", gguf=write_llama_gguf(scratch / "x.gguf"))
    model_digest = json.loads(manifest.read_text())["layers"][0]["digest"]
    blob = scratch / "ollama" / "blobs" / model_digest.replace(":", "-")
    os.unlink(blob)  # a hard link to x.gguf: replace it, same size, one byte changed
    data = bytearray((scratch / "x.gguf").read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    message = load_error("ollama:tampered")
    assert str(blob) in message and "sha256 is" in message and model_digest[7:] in message


def test_size_mismatch(scratch):
    manifest = make_ollama_model(scratch / "ollama", "short", gguf=b"GGUF-and-more")
    blob = scratch / "ollama" / "blobs" / json.loads(manifest.read_text())["layers"][0]["digest"].replace(":", "-")
    blob.write_bytes(b"GGUF")
    assert "blob is 4 bytes, but the manifest" in load_error("ollama:short")


def test_missing_tag_lists_the_tags(scratch):
    make_ollama_model(scratch / "ollama", "qwen", "0.5b", gguf=b"GGUF")
    message = load_error("ollama:qwen:7b")
    assert "no tag '7b'" in message and "0.5b" in message


def test_missing_model_says_where_it_looked(scratch):
    message = load_error("ollama:nothing-here")
    assert str(scratch / "ollama" / "manifests" / "registry.ollama.ai" / "library" / "nothing-here") in message


def test_unsupported_gguf_architecture(scratch):
    make_ollama_model(scratch / "ollama", "llama-tiny", gguf=write_llama_gguf(scratch / "llama.gguf"), family="llama")
    message = load_error("ollama:llama-tiny")
    assert "ollama:llama-tiny:latest" in message and "unsupported GGUF architecture 'llama'" in message
    assert "blobs/sha256-" in message


def test_adapter_layer_is_refused(scratch):
    manifest = make_ollama_model(scratch / "ollama", "qwen-lora", gguf=b"GGUF")
    data = json.loads(manifest.read_text())
    data["layers"].append({"mediaType": "application/vnd.ollama.image.adapter", **add_blob(scratch / "ollama", b"LoRA")})
    manifest.write_text(json.dumps(data))
    message = load_error("ollama:qwen-lora")
    assert "LoRA adapter" in message and "not run yet" in message



def test_path_traversal_in_a_digest(scratch):
    manifest = make_ollama_model(scratch / "ollama", "evil", gguf=b"GGUF")
    data = json.loads(manifest.read_text())
    data["layers"][0]["digest"] = "sha256:../../../../etc/passwd"
    manifest.write_text(json.dumps(data))
    message = load_error("ollama:evil")
    assert "invalid blob digest" in message and str(manifest) in message


def test_messages_layer_is_ignored_with_a_warning(scratch, caplog):
    make_ollama_model(scratch / "ollama", "chatty", gguf=b"GGUF", messages=[{"role": "user", "content": "x"}])
    with caplog.at_level(logging.WARNING, logger="qwen_engine"):
        source = resolve_source("ollama:chatty", progress=False)
    assert source.kind == "ollama" and "messages layer" in caplog.text


# -- Hugging Face cache ----------------------------------------------------------------------------------


def test_hf_cache_generation_matches_the_folder(stores, hf_llm):
    via_cache = hf_llm
    direct = LLM(stores["tiny"], progress=False)
    assert via_cache.path == stores["snapshot"] and via_cache.source.kind == "hf"
    messages = [{"role": "user", "content": "Hello there"}]
    assert via_cache.chat(messages, GREEDY).token_ids == direct.chat(messages, GREEDY).token_ids


def test_hf_revision_by_commit(stores):
    commit = stores["snapshot"].name
    assert resolve_source(f"{TINY_ID}@{commit}").path == stores["snapshot"]
    with pytest.raises(ModelLoadError, match="no revision 'v2'"):
        resolve_source(f"{TINY_ID}@v2")


def test_hf_missing_repo_says_where_it_looked(scratch):
    message = load_error("Qwen/Qwen2.5-VL-3B-Instruct")
    assert str(scratch / "hf" / "models--Qwen--Qwen2.5-VL-3B-Instruct") in message and "never downloads" in message


def test_hf_snapshot_without_config(scratch):
    files = scratch / "files"
    files.mkdir()
    (files / "tokenizer.json").write_text("{}")
    snapshot = make_hf_repo(scratch / "hf", "Org/NoConfig", files)
    message = load_error("Org/NoConfig")
    assert str(snapshot / "config.json") in message and "not a complete model" in message


def test_hf_snapshot_without_weights(scratch, stores):
    files = scratch / "files"
    files.mkdir()
    (files / "config.json").write_bytes((stores["tiny"] / "config.json").read_bytes())
    snapshot = make_hf_repo(scratch / "hf", "Org/NoWeights", files)
    message = load_error("Org/NoWeights")
    assert str(snapshot) in message and "no safetensors weights" in message


def test_hf_weights_link_to_a_missing_blob(scratch, stores):
    snapshot = make_hf_repo(scratch / "hf", "Org/Partial", stores["tiny"])
    (snapshot / "model.safetensors").resolve().unlink()
    message = load_error("Org/Partial")
    assert "model.safetensors link to missing blobs" in message


def test_hf_gguf_only_repo(scratch):
    files = scratch / "files"
    files.mkdir()
    write_llama_gguf(files / "model-q4_k_m.gguf")
    snapshot = make_hf_repo(scratch / "hf", "Org/Model-GGUF", files)
    assert resolve_source("Org/Model-GGUF").path == snapshot / "model-q4_k_m.gguf"
    write_llama_gguf(files / "model-q8_0.gguf")
    make_hf_repo(scratch / "hf", "Org/Two-GGUF", files)
    message = load_error("Org/Two-GGUF")
    assert "several GGUF files (model-q4_k_m.gguf, model-q8_0.gguf)" in message


def test_hf_unsupported_architecture_names_the_file(scratch):
    files = scratch / "files"
    files.mkdir()
    (files / "config.json").write_text(json.dumps({"architectures": ["Qwen2AudioForConditionalGeneration"]}))
    (files / "model.safetensors").write_bytes(b"\x00" * 16)
    snapshot = make_hf_repo(scratch / "hf", "Qwen/Qwen2-Audio-7B-Instruct", files)
    message = load_error("Qwen/Qwen2-Audio-7B-Instruct")
    assert str(snapshot / "config.json") in message and "unsupported architecture" in message


# -- qwen-engine models ----------------------------------------------------------------------------------


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen_engine.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_models_lists_every_source(stores, tmp_path, demo_gguf, monkeypatch, capsys):
    # Next to runnable models: a vision model and a foreign architecture in each store.
    root, cache = tmp_path / "ollama", tmp_path / "hf"
    make_ollama_model(root, "qwen2.5-coder", "0.5b", gguf=demo_gguf)
    # A vision language model with a projector layer (its own files are checked in test_gguf_vision.py).
    make_ollama_model(root, "qwen2.5vl", "3b", gguf=write_llama_gguf(tmp_path / "qwen25vl.gguf", "qwen25vl"),
                      projector=b"P", family="qwen25vl", model_type="3.8B")
    make_ollama_model(root, "llama-tiny", gguf=write_llama_gguf(tmp_path / "llama.gguf"), family="llama",
                      model_type="32", file_type="F32")
    make_hf_repo(cache, TINY_ID, stores["tiny"])
    vl = tmp_path / "vl"
    vl.mkdir()
    (vl / "config.json").write_text(json.dumps({"architectures": ["Qwen2_5_VLForConditionalGeneration"],
                                                "model_type": "qwen2_5_vl", "vision_config": {}}))
    (vl / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    make_hf_repo(cache, "Qwen/Qwen2.5-VL-3B-Instruct", vl)
    env = {"OLLAMA_MODELS": str(root), "HF_HUB_CACHE": str(cache), "QWEN_ENGINE_HOME": str(tmp_path / "empty")}

    table = run_cli("models", env=env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "FAMILY", "PARAMS", "QUANT", "SIZE", "RUNS"]
    rows = {line.split()[0]: line for line in lines[1:] if line.strip() and not line.startswith(" ")}
    assert rows["ollama:qwen2.5-coder:0.5b"].rstrip().endswith("text")
    assert rows[TINY_ID].rstrip().endswith("text")
    assert rows["ollama:qwen2.5vl:3b"].rstrip().endswith("vision")
    assert rows["Qwen/Qwen2.5-VL-3B-Instruct"].rstrip().endswith("vision")  # listed as runnable, by its class
    assert "unsupported: GGUF architecture llama" in rows["ollama:llama-tiny:latest"]
    assert "pull-demo" in rows["(default:"]  # listed even before it is assembled
    assert str(root) in table.stdout and str(cache) in table.stdout  # where it looked

    from qwen_engine.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["models", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert entries["(default: no --model)"]["runs"] == "text"
    coder = entries["ollama:qwen2.5-coder:0.5b"]
    assert (coder["family"], coder["params"], coder["quant"], coder["runs"]) == ("qwen2", "494.03M", "Q4_K_M", "text")
    tiny = entries[TINY_ID]
    assert (tiny["source"], tiny["family"], tiny["runs"], tiny["quant"]) == ("hf", "qwen3", "text", "float32")
    assert tiny["params"] and tiny["size"] > 0


def test_cli_reports_a_missing_ollama_model_in_one_line(stores):
    result = run_cli("generate", "--model", "ollama:qwen2.5:72b", "hi", env=stores["env"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "qwen-engine: error:" in lines[0] and "ollama model 'qwen2.5:72b' not found" in lines[0]

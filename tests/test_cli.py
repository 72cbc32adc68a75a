"""The `qwen-engine` command run as a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tiny_models import build_tiny

GREEDY = ["--temperature", "0", "--repetition-penalty", "1"]


def run(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen_engine.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=timeout, env=os.environ.copy(),
    )


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one clear line, no traceback
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, qwen3_tokenizer_dir):
    folder = tmp_path_factory.mktemp("cli-tiny")
    build_tiny("qwen3", folder, tokenizer_dir=qwen3_tokenizer_dir)
    return folder


def test_generate_streams_the_same_answer_as_the_api(demo_gguf, demo_llm):
    from qwen_engine import SamplingParams

    result = run("generate", "--max-tokens", "16", *GREEDY, "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    expected = demo_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1),
    )
    assert result.stdout == expected.text + "\n"
    assert "Paris" in result.stdout


def test_float16_kv_cache_gives_the_demo_model_the_same_answer(demo_gguf, demo_llm):
    # float16 keys and values move the demo model's next-token distributions by ~1e-6 nats (docs/benchmarks.md):
    # the greedy answer stays the float32 cache's.
    from qwen_engine import SamplingParams

    question = "Write a Python function that reverses a string."
    result = run("generate", "--kv-cache-dtype", "float16", "--max-tokens", "32", *GREEDY, question)
    assert result.returncode == 0, result.stderr
    expected = demo_llm.chat([{"role": "user", "content": question}],
                             SamplingParams(max_tokens=32, temperature=0, repetition_penalty=1))
    assert result.stdout == expected.text + "\n"


def test_generate_json(demo_gguf):
    result = run("generate", "--json", "--max-tokens", "8", *GREEDY, "--system", "Answer briefly.", "Say hello.")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) >= {"text", "reasoning", "tool_calls", "finish_reason", "usage"}
    assert data["finish_reason"] in ("stop", "length")
    assert data["usage"]["completion_tokens"] == len(data["token_ids"]) <= 8
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]


def test_chat_two_turns_from_piped_stdin(demo_gguf, demo_llm):
    from qwen_engine import SamplingParams

    result = run("chat", "--max-tokens", "12", *GREEDY, stdin="My name is Ada.\nWhat is my name?\n/exit\n")
    assert result.returncode == 0, result.stderr
    answers = result.stdout.strip("\n").split("\n")
    params = SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1)
    history = [{"role": "user", "content": "My name is Ada."}]
    first = demo_llm.chat(history, params).text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is my name?"}]
    second = demo_llm.chat(history, params).text
    assert result.stdout == f"{first}\n{second}\n", answers


def test_chat_reset_forgets(tiny_folder):
    result = run("chat", "--model", str(tiny_folder), "--max-tokens", "3", *GREEDY,
                 stdin="hello\n/reset\nhello\n")
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first == second  # after /reset the same message meets the same (empty) history
    assert "cleared" in result.stderr


def test_missing_model_path():
    assert_usage_error(run("generate", "--model", "/nonexistent/model.gguf", "hi"), "/nonexistent/model.gguf",
                       "does not exist")


def test_not_a_model_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert_usage_error(run("generate", "--model", str(path), "hi"), "neither a GGUF")


def test_truncated_gguf(demo_gguf, tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(demo_gguf, "rb") as src:
        path.write_bytes(src.read(20_000_000))
    assert_usage_error(run("generate", "--model", str(path), "hi"), str(path))


def test_unsupported_gguf_architecture(tmp_path):
    from model_stores import write_llama_gguf

    path = write_llama_gguf(tmp_path / "llama.gguf")
    assert_usage_error(run("generate", "--model", str(path), "hi"), "unsupported GGUF architecture 'llama'")


def test_unsupported_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert_usage_error(run("generate", "--model", str(tmp_path), "hi"), "unsupported architecture")


def test_folder_without_config(tmp_path):
    assert_usage_error(run("generate", "--model", str(tmp_path), "hi"), "no config.json")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--max-tokens", "0"], "max_tokens must be a positive integer"),
        (["--min-p", "2"], "min_p must be in [0, 1]"),
    ],
)
def test_invalid_sampling_values(flags, message):
    assert_usage_error(run("generate", *flags, "hi"), message)


def test_empty_prompt():
    assert_usage_error(run("generate", "   "), "prompt is empty")


def test_prompt_longer_than_context(tiny_folder):
    result = run("generate", "--model", str(tiny_folder), "--max-model-len", "16", "word " * 40)
    assert_usage_error(result, "context holds 16")


def test_pull_demo_prints_the_path(demo_gguf):
    result = run("pull-demo")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(demo_gguf)


def test_ctrl_c_in_chat_ends_cleanly(tiny_folder):
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_engine.cli", "chat", "--model", str(tiny_folder), "--max-tokens", "2",
         *GREEDY],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
        # Launched in the background without job control, the test run itself ignores SIGINT, and a child would
        # inherit that: give the chat the default disposition a user's terminal gives it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # A message, then /reset: its reply on stderr comes once the answer is done, so the chat is then idle,
        # waiting for the next line (Ctrl-C during an answer only ends that answer, as in ollama).
        proc.stdin.write("hello\n/reset\n")
        proc.stdin.flush()
        seen = []
        while not seen or "(conversation cleared)" not in seen[-1]:
            line = proc.stderr.readline()
            assert line, f"chat ended before /reset was answered: {seen}"
            seen.append(line)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err

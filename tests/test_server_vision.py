"""Images and videos through the OpenAI-compatible server (tiny Qwen2.5-VL): the official client against a real
`qwen-engine serve`, answers equal to the Python API, and every vision error as an OpenAI-style 400."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import threading

import pytest
from fastapi.testclient import TestClient
from server_process import ServerProcess
from test_vl_parity import picture

from qwen_engine import LLM, SamplingParams
from qwen_engine.server.app import ServerConfig, create_app


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def media(vision_files):
    """A local web server over the vision test files: a picture, a text file and a video (http URLs without
    leaving the machine)."""
    root = vision_files
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def llm(qwen2_5_vl_folder) -> LLM:
    return LLM(qwen2_5_vl_folder, progress=False, kv_cache_memory=32 << 20)


def test_openai_client_with_image_url_and_video_equals_the_api(qwen2_5_vl_folder, media, llm):
    from openai import OpenAI

    root, base = media
    parts = [
        {"type": "image_url", "image_url": {"url": f"{base}/photo.png"}},
        {"type": "video_url", "video_url": {"url": f"{base}/clip.mp4"}},
        {"type": "text", "text": "What happens?"},
    ]
    expected = llm.chat([{"role": "user", "content": parts}],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    server = ServerProcess("-m", str(qwen2_5_vl_folder), "--kv-cache-memory", "32MiB", "--served-model-name", "vl")
    try:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="none")
        reply = client.chat.completions.create(
            model="vl", messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=6,
            extra_body={"ignore_eos": True},
        )
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
        # streamed: the same text in pieces
        stream = client.chat.completions.create(
            model="vl", messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=6,
            stream=True, extra_body={"ignore_eos": True},
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == expected.text
    finally:
        assert server.stop() == 0


def ask(client: TestClient, parts: list[dict], **extra):
    body = {"model": "vl", "messages": [{"role": "user", "content": parts}], "max_tokens": 2, **extra}
    return client.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize(
    "parts, status, fragment, param",
    [
        ([{"type": "image_url", "image_url": {"url": "{base}/missing.png"}}], 400, "404", "messages[0].content[0]"),
        ([{"type": "image_url", "image_url": {"url": "{base}/notes.txt"}}], 400, "image", "messages[0].content[0]"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], 400, "base64", None),
        ([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}], 400, "x.png", None),
        ([{"type": "image_url", "image_url": {}}], 400, "url", None),
        ([{"type": "video_url", "video_url": {"url": "file://{root}/notes.txt"}}], 400, "notes.txt", None),
        ([{"type": "video_url", "video_url": {"url": "{base}/notes.txt"}}], 400, "{base}/notes.txt", None),
        ([{"type": "video_url", "video_url": {"url": "{base}/gone.mp4"}}], 400, "404", None),
        ([{"type": "image_url", "image_url": {"url": "{photo}"}}] * 3, 400, "limit is 2", "messages"),
        ([{"type": "audio", "audio": "x"}], 400, "audio", "messages[0].content[0]"),
    ],
)
def test_vision_errors_are_openai_400s(llm, media, parts, status, fragment, param):
    root, base = media
    photo = data_url(picture(64, 64, 1))

    def fill(value):
        if isinstance(value, str):
            return value.format(base=base, root=root, photo=photo)
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    config = ServerConfig("vl", max_images_per_request=2, fetch_timeout=3)
    with TestClient(create_app(llm, config)) as client:
        r = ask(client, [fill(p) for p in parts])
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert fill(fragment) in error["message"], error["message"]
        if param is not None:
            assert error["param"] == param
        # the server is still fine
        ok = ask(client, [{"type": "image_url", "image_url": {"url": photo}}, {"type": "text", "text": "hi"}])
        assert ok.status_code == 200


def test_max_image_pixels_resizes_down(llm):
    config = ServerConfig("vl", max_image_pixels=64 * 28 * 28)
    big = data_url(picture(1000, 800, 2))
    with TestClient(create_app(llm, config)) as client:
        r = ask(client, [{"type": "image_url", "image_url": {"url": big}}, {"type": "text", "text": "hi"}])
        assert r.status_code == 200
        small = r.json()["usage"]["prompt_tokens"]
    llm.vision.limits = type(llm.vision.limits)()  # no cap
    full = llm.encode_chat([{"role": "user", "content": [{"type": "image", "image": big}, {"type": "text", "text": "hi"}]}])
    assert small < len(full.token_ids)
    assert small - (len(full.token_ids) - full.items[0].num_tokens) <= 64  # at most 64 merged tokens


def test_prompt_too_long_for_context_names_the_budget(qwen2_5_vl_folder, media):
    root, _ = media
    llm = LLM(qwen2_5_vl_folder, progress=False, kv_cache_memory=16 << 20, max_model_len=64)
    with TestClient(create_app(llm, ServerConfig("vl"))) as client:
        r = ask(client, [{"type": "video_url", "video_url": {"url": f"file://{root}/clip.mp4"}}])
        assert r.status_code == 400
        assert "63" in r.json()["error"]["message"]


def test_responses_api_with_an_input_image_equals_chat(llm):
    photo = data_url(picture(96, 64, 3))
    config = ServerConfig("vl")
    with TestClient(create_app(llm, config)) as client:
        chat = ask(client, [{"type": "image_url", "image_url": {"url": photo}}, {"type": "text", "text": "What?"}],
                   temperature=0, max_tokens=5, ignore_eos=True).json()
        body = {"model": "vl", "temperature": 0, "max_output_tokens": 5, "ignore_eos": True, "input": [
            {"role": "user", "content": [{"type": "input_image", "image_url": photo},
                                         {"type": "input_text", "text": "What?"}]}]}
        r = client.post("/v1/responses", json=body).json()
        (message,) = [item for item in r["output"] if item["type"] == "message"]
        assert message["content"][0]["text"] == chat["choices"][0]["message"]["content"]
        assert r["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]

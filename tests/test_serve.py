"""The server from outside, as its users meet it: `python -m tinyllava.serve` on a free port, the real `openai`
client and a headless Chromium against it, and every answer compared with what the library answers one request
at a time (Llava.answer on the same weights, in this process)."""
import base64
import io
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openai
import pytest
from PIL import Image

from tinyllava import runtime
from tinyllava.decoding import Sampling
from tinyllava.image import preprocess
from tinyllava.model import chat_prompt, load_llava, split_prompt
from tinyllava.serve import IMAGE, Engine, Limits, Server, StopText, parse_chat
from tinyllava.weights import demo_photos, stage2_paths

QUEUE = 7          # the test server's --queue: 8 requests at once fit, a 9th gets 429
N = 12             # max_tokens of the compared answers: long enough to differ, short for time
MAX_PIXELS = 1_000_000
MAX_BODY = 2 << 20


# -- fixtures: the server in its own process, the library in this one ------------------------------------------------
def start_server(log, *args):  # -> (process, base URL), once it says it is listening
    proc = subprocess.Popen([sys.executable, "-m", "tinyllava.serve", "--port", "0", *args],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.time() + 300          # the first run on a machine compiles numba's loops
    while not (m := re.search(r"listening on (http://\S+/)", log.read_text())):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc, m.group(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    # one thread, as the library here has: the two processes then share the two cores without fighting
    proc, url = start_server(log, "--queue", str(QUEUE), "--threads", "1", "--max-images",
                             "2", "--max-image-pixels", str(MAX_PIXELS), "--max-body", str(MAX_BODY),
                             "--max-tokens", "400")
    yield SimpleNamespace(proc=proc, url=url, log=log, port=int(url.rsplit(":", 1)[1].strip("/")))
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def llava():  # the library, loaded as the server loads it: the stage-2 model on the fused engine
    projector, adapter = stage2_paths()
    return load_llava(projector, quantized=True, adapter=adapter)


class Library:
    """The library's answers (Llava.answer, one request at a time), each computed once, in order, on a thread of
    their own with one thread for the products (as the test server has). Asked for ahead, they are computed while
    the server answers the same questions."""

    def __init__(self, llava):
        self.llava, self.pool, self.answers, self.tokens = llava, ThreadPoolExecutor(1), {}, {}
        self.pool.submit(runtime.use_threads, 1)

    def future(self, question, image=None, history=(), n=N, system=None, **sampling):
        key = json.dumps([question, str(image), history, n, system, sampling])
        if key not in self.answers:
            self.answers[key] = self.pool.submit(self.answer, question, image, history, n, system, sampling)
        return self.answers[key]

    def __call__(self, question, image=None, history=(), n=N, system=None, **sampling):
        return self.future(question, image, history, n, system, **sampling).result()

    def second_turn(self, first, image, second, n=N):  # the answer to `second` after the library's to `first`
        one = self.future(first, image, n=n)          # (submitted before, so done when the second turn runs)
        return self.pool.submit(lambda: self.answer(second, image, [{"role": "user", "content": first},
                                                                    {"role": "assistant", "content": one.result()}],
                                                    n, None, {}))

    def answer(self, question, image, history, n, system, sampling):  # (on the pool's thread)
        if image is not None and image not in self.tokens:
            self.tokens[image] = self.llava.image_tokens(preprocess(image, pad=True)[None])[0]
        images = [self.tokens[image]] if image is not None else []
        return self.llava.answer(question, images, history, system, Sampling(n, **sampling))


ANIMAL, COLOUR, RAINBOW, POEM = ("What animal is in the picture?", "What colour is it?",
                                 "Name three colours of the rainbow.", "Write a short poem about the sea.")


@pytest.fixture(scope="module")
def library(llava):
    threads = runtime.THREADS
    lib = Library(llava)
    # what the tests below ask, in their order, computed while the server answers
    lib.future(ANIMAL, photo("chelsea.png"))
    lib.future(RAINBOW)
    lib.future("Say hello.")
    lib.colour = lib.second_turn(ANIMAL, photo("chelsea.png"), COLOUR)
    lib.future(POEM, n=8, temp=1.0, top_p=0.9, seed=5)
    lib.future(POEM, system="You are a pirate.")
    for q, i in CONCURRENT:
        lib.future(q, photo(i) if i else None)
    yield lib
    lib.pool.shutdown()
    runtime.use_threads(threads)


def photo(name):
    return demo_photos()[name]


def data_url(path_or_bytes, kind="image/png"):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def user(text, *images):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
            + ([{"type": "text", "text": text}] if text else [])}


def png(width, height, kind="PNG", noise=True):  # an image file's bytes (noise does not compress to nothing)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8) if noise else \
        np.full((height, width, 3), 128, np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, kind)
    return out.getvalue()


def health(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return json.loads(read_all(s).split(b"\r\n\r\n", 1)[1])


def read_all(s):
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def rss_mb(pid):
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def raw(server, request):  # bytes of a whole HTTP request -> (status, parsed JSON body)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(request)
        head, _, body = read_all(s).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post(body, content_type="application/json", host="127.0.0.1", extra=b""):
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n%s\r\n%s" % (host.encode(), content_type.encode(), len(body), extra, body))


# -- answers --------------------------------------------------------------------------------------------------------
def test_an_answer_about_an_image_is_the_librarys(client, llava, library):
    r = client.chat.completions.create(model="tinyllava", messages=[user(ANIMAL, photo("chelsea.png"))],
                                       max_tokens=N, temperature=0)
    answer = library(ANIMAL, photo("chelsea.png"))
    assert r.choices[0].message.content == answer and "cat" in answer
    assert r.choices[0].finish_reason == "stop" and r.model == "tinyllava" and r.object == "chat.completion"
    text = chat_prompt(llava.tok, ANIMAL, 1, llava.system)           # the prompt's tokens: its text's, and the
    prompt = sum(len(llava.tok.encode(p)) for p in split_prompt(text) if p != IMAGE) + 196   # image's 196
    ids = llava.tok.encode(answer)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, len(ids),
                                                                                        prompt + len(ids))


def test_streaming_sends_the_answer_piece_by_piece(client, library):
    chunks = list(client.chat.completions.create(model="tinyllava", messages=[{"role": "user", "content": RAINBOW}],
                                                 max_tokens=N, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == library(RAINBOW)
    assert len(pieces) >= 5                                        # streamed, not sent whole at the end
    assert chunks[-2].choices[0].finish_reason == "length"         # N tokens, the answer not finished
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N


def test_an_http_1_0_stream_ends_by_closing(server, library):
    """HTTP/1.0 (what nginx's proxy_pass speaks by default) has no chunked encoding: the events go out as they are,
    and the end of the connection ends the stream."""
    body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": N,
                       "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as s:
        s.sendall(post(body).replace(b"HTTP/1.1", b"HTTP/1.0"))
        head, _, events = read_all(s).partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and events.startswith(b"data: {") and events.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(e[6:]) for e in events.split(b"\n\n") if e.startswith(b"data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == library("Say hello.")


def test_multi_turn_keeps_the_image_in_the_conversation(client, library):
    messages = [user(ANIMAL, photo("chelsea.png"))]
    a1 = client.chat.completions.create(model="tinyllava", messages=messages, max_tokens=N,
                                        temperature=0).choices[0].message.content
    messages += [{"role": "assistant", "content": a1}, {"role": "user", "content": COLOUR}]
    a2 = client.chat.completions.create(model="tinyllava", messages=messages, max_tokens=N,
                                        temperature=0).choices[0].message.content
    assert a1 == library(ANIMAL, photo("chelsea.png"))       # so the library's second turn had the same history
    assert a2 == library.colour.result()


def test_stop_strings_seeds_and_a_system_message(client, library):
    ask = [{"role": "user", "content": POEM}]
    whole = client.chat.completions.create(model="tinyllava", messages=ask, max_tokens=20).choices[0].message.content
    cut = next(w for w in whole.split() if whole.index(w) > 5)        # a word well inside the answer
    r = client.chat.completions.create(model="tinyllava", messages=ask, max_tokens=20, stop=["zzz", cut])
    assert r.choices[0].message.content == whole[:whole.index(cut)] and r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tinyllava", messages=ask, max_tokens=20, stop=cut, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole[:whole.index(cut)]
    sampled = [client.chat.completions.create(model="tinyllava", messages=ask, max_tokens=8, temperature=1.0,
                                              top_p=0.9, seed=seed).choices[0].message.content for seed in (5, 5)]
    assert sampled[0] == sampled[1] == library(POEM, n=8, temp=1.0, top_p=0.9, seed=5)
    system = [{"role": "system", "content": "You are a pirate."}] + ask
    assert client.chat.completions.create(model="tinyllava", messages=system, max_tokens=N).choices[0].message.content \
        == library(POEM, system="You are a pirate.")


def test_models_health_and_the_page_are_served(server, client):
    assert [m.id for m in client.models.list().data] == ["tinyllava"]
    assert health(server) == {"status": "ok", "running": 0, "waiting": 0, "cancelled": 0}
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        head, _, body = read_all(s).partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"connect-src 'self'" in head and b"<script>" in body
    assert not re.search(rb"(src|href)=\"?(https?:)?//", body)        # nothing fetched from elsewhere


# -- bad requests: each a 4xx in OpenAI's shape, and the server goes on ------------------------------------------------
TINY = data_url(png(32, 32))
BAD = [  # (what, request keyword arguments for the openai client, status, code, param)
    ("unknown model", dict(model="gpt-4o"), 404, "model_not_found", "model"),
    ("no messages", dict(messages=[]), 400, "missing_messages", "messages"),
    ("messages not a list", dict(messages="hello"), 400, "invalid_type", "messages"),
    ("a message not an object", dict(messages=["hello"]), 400, "invalid_type", "messages[0]"),
    ("a role unknown", dict(messages=[{"role": "robot", "content": "hi"}]), 400, "invalid_value", "messages[0].role"),
    ("content missing", dict(messages=[{"role": "user"}]), 400, "missing_content", "messages[0].content"),
    ("content a number", dict(messages=[{"role": "user", "content": 5}]), 400, "invalid_type", "messages[0].content"),
    ("an empty message", dict(messages=[{"role": "user", "content": "  "}]), 400, "empty_message",
     "messages[0].content"),
    ("no parts", dict(messages=[{"role": "user", "content": []}]), 400, "empty_message", "messages[0].content"),
    ("a part of an unknown type", dict(messages=[{"role": "user", "content": [{"type": "audio", "data": "x"}]}]), 400,
     "invalid_type", "messages[0].content[0]"),
    ("the last message the assistant's", dict(messages=[{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"}]), 400,
     "invalid_value", "messages"),
    ("an image from the assistant", dict(messages=[{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": TINY}}]}, {"role": "user", "content": "hi"}]), 400, None,
     "messages[0].content[0]"),
    ("<image> in the text", dict(messages=[{"role": "user", "content": "look: <image>"}]), 400, None,
     "messages[0].content[0]"),
    ("temperature a string", dict(temperature="hot"), 400, "invalid_type", "temperature"),
    ("temperature too high", dict(temperature=3), 400, "invalid_value", "temperature"),
    ("max_tokens zero", dict(max_tokens=0), 400, "invalid_value", "max_tokens"),
    ("max_tokens over the limit", dict(max_tokens=100_000), 400, "invalid_value", "max_tokens"),
    ("max_tokens a bool", dict(max_tokens=True), 400, "invalid_type", "max_tokens"),
    ("top_p zero", dict(top_p=0), 400, "invalid_value", "top_p"),
    ("n of 2", dict(n=2), 400, "invalid_value", "n"),
    ("stream a string", dict(stream="yes"), 400, "invalid_type", "stream"),
    ("five stop strings", dict(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value", "stop"),
    ("a seed not a number", dict(seed="x"), 400, "invalid_type", "seed"),
    ("non-image data in an image part", dict(messages=[user("what?", b"hello, not an image")]), 400, "invalid_image",
     "messages[0].content[0].image_url"),
    ("malformed base64", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]), 400, "invalid_image", None),
    ("a text data: URL", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}]), 400, "invalid_image", None),
    ("a GIF", dict(messages=[user("what?", png(32, 32, "GIF"))]), 400, "invalid_image", None),
    ("an image URL not data:", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]}]), 400, "remote_image_refused",
     None),
    ("an image_url without url", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": "x"}]}]), 400, "invalid_type", None),
    ("an image too small", dict(messages=[user("what?", png(8, 8))]), 400, "invalid_image", None),
    ("an image of too many pixels", dict(messages=[user("what?", png(1100, 1000, noise=False))]), 400,
     "image_too_large", None),
    ("a truncated image", dict(messages=[user("what?", png(64, 64)[:2000])]), 400, "invalid_image", None),
    ("too many images", dict(messages=[user("which?", png(32, 32), png(32, 32), png(32, 32))]), 400,
     "too_many_images", "messages"),
    ("more text than the context", dict(messages=[{"role": "user", "content": "word " * 14000}]), 400,
     "context_length_exceeded", "messages"),
    ("a prompt and max_tokens past the context", dict(messages=[{"role": "user", "content": "hi " * 7900}],
                                                      max_tokens=400), 400, "context_length_exceeded", "messages"),
    ("a body over --max-body", dict(messages=[{"role": "user", "content": "x" * (MAX_BODY + 10)}]), 413,
     "request_too_large", None),
]


def check_error(status, body, expected_status, code=None, param=None):
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    e = body["error"]
    assert isinstance(e["message"], str) and e["message"] and "Traceback" not in e["message"]
    assert e["type"] == ("invalid_request_error" if expected_status != 401 else "authentication_error")
    if code:
        assert e["code"] == code, e
    if param:
        assert e["param"] == param, e


@pytest.mark.parametrize("what, kwargs, status, code, param", BAD, ids=[b[0] for b in BAD])
def test_a_bad_request_gets_a_4xx_in_openais_shape(client, what, kwargs, status, code, param):
    request = {"model": "tinyllava", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**request)
    check_error(e.value.status_code, {"error": e.value.body}, status, code, param)


BAD_HTTP = [  # (what, raw request, status, code)
    ("malformed JSON", post(b'{"messages": [}'), 400, "invalid_json"),
    ("JSON not an object", post(b"[1, 2]"), 400, "invalid_json"),
    ("not UTF-8", post(b'{"messages": "\xff"}'), 400, "invalid_json"),
    ("a lone surrogate", post(b'{"messages": [{"role": "user", "content": "\\ud800"}]}'), 400, None),
    ("deeply nested JSON", post(b"[" * 100_000 + b"]" * 100_000), 400, "invalid_json"),
    ("not JSON", post(b"messages=hi", "application/x-www-form-urlencoded"), 415, "unsupported_media_type"),
    ("no Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                          b"\r\nConnection: close\r\n\r\n", 411, "length_required"),
    ("another site's Host (DNS rebinding)", post(b'{"messages": []}', host="evil.example:8080"), 400, "invalid_host"),
    ("a Host that only starts like 127.", post(b'{"messages": []}', host="127.0.0.1.evil.example"), 400,
     "invalid_host"),
    ("an unknown path", b"GET /v1/engines HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 404, "not_found"),
    ("GET on the chat API", b"GET /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
     405, None),
    ("an unsupported method", b"DELETE /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", 405, None),
    ("a method that does not exist", b"BREW / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", 405, None),
    ("a garbled request line", b"GET / what is this HTTP/1.1\r\nConnection: close\r\n\r\n", 400, None),
]


@pytest.mark.parametrize("what, request_bytes, status, code", BAD_HTTP, ids=[b[0] for b in BAD_HTTP])
def test_bad_http_gets_a_4xx_in_openais_shape(server, what, request_bytes, status, code):
    check_error(*raw(server, request_bytes), status, code)


def test_the_server_goes_on_after_the_bad_requests(server, client, library):
    assert health(server)["status"] == "ok"
    r = client.chat.completions.create(model="tinyllava", messages=[{"role": "user", "content": "Say hello."}],
                                       max_tokens=N)
    assert r.choices[0].message.content == library("Say hello.")


def test_an_api_key_and_remote_images_when_asked_for(llava, library):
    """--api-key and --allow-remote-images, on a second server in this process (the classes main() puts together);
    the remote image comes from a file server on the loopback address."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    files = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler,
                                                                    directory=photo("chelsea.png").parent))
    server = Server(("127.0.0.1", 0), Limits(allow_remote=True), api_key="sesame", engine=Engine(llava, threads=1))
    for s in (files, server):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        check_error(401, {"error": e.value.body}, 401, "invalid_api_key")
        no_key = SimpleNamespace(port=server.server_address[1])
        check_error(*raw(no_key, post(b'{"messages": [{"role": "user", "content": "Hi"}]}')), 401, "invalid_api_key")
        ok = openai.OpenAI(base_url=url, api_key="sesame", max_retries=0, timeout=300)
        assert [m.id for m in ok.models.list().data] == ["tinyllava"]
        there = f"http://127.0.0.1:{files.server_address[1]}/"
        r = ok.chat.completions.create(model="tinyllava", max_tokens=N, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": there + "chelsea.png"}}, {"type": "text", "text": ANIMAL}]}])
        assert r.choices[0].message.content == library(ANIMAL, photo("chelsea.png"))
        with pytest.raises(openai.BadRequestError) as e:
            ok.chat.completions.create(model="tinyllava", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": there + "no-such.png"}}]}])
        check_error(400, {"error": e.value.body}, 400, "invalid_image")
        assert "404" in e.value.body["message"]
    finally:
        for s in (files, server):
            s.shutdown()
            s.server_close()
        server.engine.close()


# -- several clients at once ------------------------------------------------------------------------------------------
CONCURRENT = [("What animal is in the picture?", "chelsea.png"), ("What is she wearing?", "astronaut.png"),
              ("Describe the image concisely.", "chelsea.png"), ("What is in the background?", "astronaut.png"),
              ("What is the capital of France?", None), ("Name a fruit.", None), ("Count to five.", None),
              ("What is 2 + 2?", None)]


def test_eight_concurrent_clients_get_the_library_answers_one_at_a_time(server, client, library):
    rss_before = rss_mb(server.proc.pid)
    start = threading.Barrier(len(CONCURRENT))

    def ask(case):
        question, image = case
        start.wait()
        t0 = time.time()
        r = client.chat.completions.create(model="tinyllava", max_tokens=N, temperature=0, messages=[
            user(question, photo(image)) if image else {"role": "user", "content": question}])
        return r.choices[0].message.content, t0, time.time()

    with ThreadPoolExecutor(len(CONCURRENT)) as pool:
        futures = [pool.submit(ask, case) for case in CONCURRENT]
        expected = [library(q, photo(i) if i else None) for q, i in CONCURRENT]  # (one at a time, meanwhile)
        got = [f.result() for f in futures]
    assert [g[0] for g in got] == expected
    assert max(g[1] for g in got) < min(g[2] for g in got)          # all eight were in flight together
    assert health(server)["running"] == health(server)["waiting"] == 0
    assert rss_mb(server.proc.pid) < rss_before + 40                  # its memory back near where it was


LONG = {"max_tokens": 300, "temperature": 2.0, "seed": 0}   # near-uniform sampling: it never ends early


def stream_request(server, question):  # a raw streaming request for a long answer -> its socket, nothing read
    body = json.dumps({"messages": [{"role": "user", "content": question}], "stream": True, **LONG}).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    s.sendall(post(body))
    return s


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.05)


def test_a_client_that_disconnects_mid_stream_frees_its_place(server, client):
    cancelled = health(server)["cancelled"]
    stream = client.chat.completions.create(model="tinyllava", stream=True, **LONG, messages=[
        {"role": "user", "content": "Tell me a long story."}])
    got = [next(stream) for _ in range(4)]
    assert got[1].choices[0].delta.content
    stream.close()                                                     # gone, 300 tokens from done
    wait_for(lambda: health(server) == {"status": "ok", "running": 0, "waiting": 0, "cancelled": cancelled + 1},
             10, "the answer went on after its client closed the stream")


def test_a_full_queue_gets_429_and_disconnects_free_the_places(server, client, library):
    cancelled = health(server)["cancelled"]
    first, seen = stream_request(server, "Tell me a long story."), b""
    while b"data: " not in seen:                                       # the first answer is streaming
        seen += first.recv(4096)
    waiting = [stream_request(server, f"Tell me story number {i}.") for i in range(QUEUE)]
    wait_for(lambda: health(server)["waiting"] == QUEUE, 20, "the requests did not queue")
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="tinyllava", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    check_error(429, {"error": e.value.body}, 429, "rate_limit_exceeded")
    for s in [first] + waiting:                                        # every client leaves without a word
        s.close()
    wait_for(lambda: health(server) == {"status": "ok", "running": 0, "waiting": 0,
                                        "cancelled": cancelled + 1 + QUEUE}, 10, "the places were not given back")
    r = client.chat.completions.create(model="tinyllava", messages=[{"role": "user", "content": "Say hello."}],
                                       max_tokens=N)
    assert r.choices[0].message.content == library("Say hello.")


# -- the page, in a real browser ---------------------------------------------------------------------------------------
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"                      # Debian's chromium and chromium-driver
    with tempfile.TemporaryDirectory() as profile:
        for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        yield driver
        driver.quit()


def test_the_page_chats_about_an_image_in_chromium(server, browser, library):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(server.url)
    assert browser.title == "tinyllava"
    browser.find_element(By.ID, "image").send_keys(str(photo("chelsea.png")))
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "preview").is_displayed())
    browser.find_element(By.CSS_SELECTOR, "summary").click()
    browser.find_element(By.ID, "max").clear()
    browser.find_element(By.ID, "max").send_keys(str(N))

    def ask(question, turn):  # -> the answer shown, once it has streamed in
        browser.find_element(By.ID, "question").send_keys(question)
        browser.find_element(By.ID, "send").click()
        done = f"#log .assistant:nth-of-type({2 * turn})[data-done]"
        WebDriverWait(browser, 180).until(lambda d: d.find_elements(By.CSS_SELECTOR, done))
        assert browser.find_element(By.ID, "status").text == ""        # no error shown
        return browser.find_element(By.CSS_SELECTOR, done).text

    assert ask(ANIMAL, 1) == library(ANIMAL, photo("chelsea.png"))
    assert browser.find_elements(By.CSS_SELECTOR, "#log .user img")   # the picture shown with the question
    assert ask(COLOUR, 2) == library.colour.result()                   # the image stays in the conversation
    assert len(browser.find_elements(By.CSS_SELECTOR, "#log .turn")) == 4


# -- pieces, without a server ------------------------------------------------------------------------------------------
def test_stop_text_holds_back_what_could_start_a_stop_string():
    from tinyllava.serve import Stopped
    s = StopText(["\nUser:", "END"])
    assert s.push("Hello") == "Hello"
    assert s.push(" world\nUs") == " world"                          # "\nUs" might begin "\nUser:"
    assert s.push("ual") == "\nUsual"                                 # it did not
    assert s.push("E") == "" and s.held == "E"
    with pytest.raises(Stopped) as e:
        s.push("ND of it")
    assert str(e.value) == ""


def test_png_jpeg_webp_and_a_phones_mpo_are_read():
    from tinyllava.serve import decode_image
    photo_ = Image.open(photo("chelsea.png")).convert("RGB")
    for kind in ("PNG", "JPEG", "WEBP", "MPO"):   # MPO: a JPEG with a second picture after it, as phones write
        f = io.BytesIO()
        photo_.save(f, kind, **({"save_all": True, "append_images": [photo_]} if kind == "MPO" else {}))
        assert Image.open(f).format == kind
        assert decode_image(f.getvalue(), "p", Limits(), True).shape == (3, 224, 224)


def test_messages_become_the_librarys_prompt():
    r = parse_chat({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": TINY}},
                                     {"type": "text", "text": "Hi?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
        {"role": "user", "content": "And?"}]}, Limits())
    assert r.system == "Be brief." and r.question == "And?" and [u for u, _ in r.images] == [TINY]
    assert r.history == [{"role": "user", "content": f"{IMAGE}\nHi?"}, {"role": "assistant", "content": "Hello."}]
    r = parse_chat({"messages": [user("", photo("chelsea.png"))]}, Limits())   # an image alone: a caption
    assert r.question == f"{IMAGE}\nDescribe the image concisely."
    assert (r.temperature, r.top_p, r.max_tokens, r.stream) == (0.0, 1.0, None, False)


def test_no_traceback_in_the_servers_log(server):
    """Every request above, good or bad, was answered without a bug's traceback on the server's stderr."""
    assert "Traceback" not in server.log.read_text()
    assert server.proc.poll() is None                                  # and it is still up

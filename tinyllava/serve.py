"""Serve LLaVA over HTTP: OpenAI's chat completions API, and a chat page for a browser.

    python -m tinyllava.serve                      # http://127.0.0.1:8080/

    GET  /                      the chat page (chat.html, beside this file): pick or drop an image, ask, watch
                                the answer stream in, ask again
    POST /v1/chat/completions   OpenAI's chat completions: text and image_url parts (data: URLs of PNG, JPEG or
                                WebP), stream false or true (server-sent events), max_tokens, temperature, top_p,
                                seed, stop; usage counts
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", "running": 0 or 1, "waiting": n, "cancelled": n}

One thread runs the model, one request at a time, and the others wait their turn in a bounded queue (a request
beyond --queue waiting ones gets 429). Each answer is therefore exactly what the library answers
(Llava.answer) token for token: decoding several requests in one batch would run the batched products, whose
sums come out in another order and can change a greedy answer (README, "Serve it"). A conversation sends its
image again with every turn; the image tokens of recent images are kept, so later turns skip the vision tower.

The standard library serves it (http.server's ThreadingHTTPServer: a thread per connection, which only reads,
checks and waits): server-sent events go out as chunked HTTP, and a client that goes away, while waiting or
while its answer streams, is noticed within a token and its place given up. Errors are OpenAI's JSON,
{"error": {"message", "type", "param", "code"}}, with 400, 401, 404, 405, 411, 413, 415, 429 or 503; a bug
is a 500 with its traceback on the server's stderr, never in the reply.
"""
import argparse
import base64
import binascii
import hashlib
import hmac
import io
import ipaddress
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

from .decoding import Sampling
from .errors import TinyLlavaError, cli_errors
from .model import IMAGE, chat_prompt
from .options import (
    CAPTION_REQUEST,
    add_model_options,
    model_files,
    quantized,
    threads_option,
)

MODEL_ID = "tinyllava"
IMAGE_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
MAX_STOP = 4              # stop strings, as OpenAI allows
IMAGE_CACHE = 32          # images whose tokens are kept ([196, 576] float32: 0.45 MB each)
MAX_CONNECTIONS = 64      # open connections; beyond, 503 at once (each is a thread)
SOCKET_TIMEOUT = 30       # seconds a connection may sit silent while sending a request, or not read its answer
POLL = 0.2                # seconds between looks at whether a waiting client is still there


# -- errors in OpenAI's shape --------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message, param=None, code=None):  # 400
    return APIError(400, message, param, code)


# -- a request, checked ----------------------------------------------------------------------------------------
@dataclass
class Limits:
    max_body: int = 20 << 20          # bytes of a request
    max_images: int = 4               # images in one request (each is 196 tokens and a pass of the vision tower)
    max_pixels: int = 25_000_000      # pixels of one image (a 12 MP phone photo passes)
    max_tokens: int = 1024            # tokens one answer may ask for
    queue: int = 16                   # requests waiting beyond the one being answered
    allow_remote: bool = False        # fetch http(s) image URLs
    context: int = 8192               # the decoder's context (set from the model)


@dataclass
class ChatRequest:
    system: str = None                # the leading system message(s); None: the model's own
    history: list = field(default_factory=list)   # the turns before the question, {"role", "content"}
    question: str = ""                # the last user message, <image> where its images stand
    images: list = field(default_factory=list)    # the image URLs, in the order of their <image> markers
    max_tokens: int = None            # None: --max-tokens, or what the context leaves if less
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = None
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def typed(body, name, kinds, what, default=None):  # body[name] if of the kinds (bools are not numbers here)
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise bad(f"'{name}' must be {what}, not {json.dumps(v)[:40]}", name, "invalid_type")
    return v


def number(body, name, lo, hi, default, integer=False):
    v = typed(body, name, (int,) if integer else (int, float), "an integer" if integer else "a number", default)
    if v is not None and not lo <= v <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}, not {v}", name, "invalid_value")
    return v


def message_text(content, where, role, images):
    """A message's content (a string, or a list of text and image_url parts) -> its text, with <image> where each
    image stands (LLaVA's "<image>\\nquestion" when the image comes first); the image URLs go onto `images`."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    elif content is None:
        raise bad(f"{where}.content is missing", f"{where}.content", "missing_content")
    else:
        raise bad(f"{where}.content must be a string or a list of parts", f"{where}.content", "invalid_type")
    pieces = []
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text = part["text"]
            if IMAGE in text:
                raise bad(f"{at}: the text may not contain {IMAGE}; send images as image_url parts", at)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise bad(f"{at}: the text is not valid Unicode (a lone surrogate)", at) from None
            pieces.append(text)
        elif kind == "image_url" and role == "user":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else None
            if not isinstance(url, str):
                raise bad(f"{at}.image_url must be an object with a string 'url'", f"{at}.image_url", "invalid_type")
            images.append((url, f"{at}.image_url"))
            pieces.append(IMAGE)
        elif kind == "image_url":
            raise bad(f"{at}: only user messages may carry images", at)
        else:
            raise bad(f"{at} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', 'image_url': "
                      f"{{'url': ...}}}}", at, "invalid_type")
    return "\n".join(pieces)


def parse_chat(body, limits):
    """A chat completion request's JSON (a dict) -> ChatRequest, or APIError naming the field at fault."""
    model = typed(body, "model", (str,), "a string")
    if model is not None and model != MODEL_ID:
        raise APIError(404, f"the model '{model}' does not exist: this server serves '{MODEL_ID}'", "model",
                       "model_not_found")
    messages = typed(body, "messages", (list,), "a list of messages")
    if not messages:
        raise bad("'messages' is " + ("missing" if messages is None else "empty"), "messages", "missing_messages")
    r, turns, images, chars = ChatRequest(), [], [], 0
    system = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"{where}.role must be 'system', 'developer', 'user' or 'assistant', not "
                      f"{json.dumps(role)[:40]}", f"{where}.role", "invalid_value")
        n = len(images)
        text = message_text(m.get("content"), where, role, images)
        if not text.replace(IMAGE, "").strip() and len(images) == n:   # no words, no image
            raise bad(f"{where} is empty", f"{where}.content", "empty_message")
        chars += len(text)
        if role in ("system", "developer") and not turns:  # leading system turns: the one system turn
            system.append(text)
        else:
            turns.append({"role": "system" if role == "developer" else role, "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise bad("the last message must be the user's: it is the one answered", "messages", "invalid_value")
    if len(images) > limits.max_images:
        raise bad(f"{len(images)} images, more than this server takes in one request ({limits.max_images}, "
                  f"--max-images)", "messages", "too_many_images")
    if chars > 8 * limits.context:   # a token is rarely 8 characters: this much text cannot fit the context
        raise bad(f"the messages are {chars} characters, far more than the model's context of {limits.context} "
                  f"tokens", "messages", "context_length_exceeded")
    if not turns[-1]["content"].replace(IMAGE, "").strip():   # images alone: asked for a caption, as generate does
        turns[-1]["content"] += "\n" + CAPTION_REQUEST
    r.system = "\n".join(system) if system else None
    r.history, r.question, r.images = turns[:-1], turns[-1]["content"], images
    if number(body, "n", 1, 1, 1, integer=True) != 1:
        raise bad("'n' must be 1", "n")
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    r.max_tokens = number({name: tokens}, name, 1, limits.max_tokens, None, integer=True)
    r.temperature = number(body, "temperature", 0, 2, 0.0)
    r.top_p = number(body, "top_p", 0, 1, 1.0)
    if r.top_p == 0:
        raise bad("'top_p' must be above 0", "top_p", "invalid_value")
    r.top_k = number(body, "top_k", 0, 1 << 20, 0, integer=True)       # llama.cpp's extension
    seed = typed(body, "seed", (int,), "an integer")
    r.seed = None if seed is None else seed % (1 << 64)                # NumPy's generator takes no negative seed
    stop = typed(body, "stop", (str, list), "a string or a list of strings")
    r.stop = [stop] if isinstance(stop, str) else stop or []
    if len(r.stop) > MAX_STOP or not all(isinstance(s, str) and s for s in r.stop):
        raise bad(f"'stop' must be up to {MAX_STOP} non-empty strings", "stop", "invalid_value")
    r.stream = typed(body, "stream", (bool,), "true or false", False)
    options = typed(body, "stream_options", (dict,), "an object", {})
    r.include_usage = typed(options, "include_usage", (bool,), "true or false", False)
    return r


# -- images -----------------------------------------------------------------------------------------------------
def image_bytes(url, param, limits):
    """An image_url's bytes: a data: URL's base64, or (with --allow-remote-images) what an http(s) URL returns."""
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        kind, *flags = header.split(";")
        if not comma or "base64" not in flags:
            raise bad("the image's data: URL must be base64: data:image/png;base64,...", param, "invalid_image")
        if kind.lower() not in IMAGE_FORMATS:
            raise bad(f"'{kind[:40]}' is not an image type this server reads (PNG, JPEG, WebP)", param,
                      "invalid_image")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad("the image's base64 data is malformed", param, "invalid_image") from None
    if not url.startswith(("http://", "https://")):
        raise bad("an image URL must be a data: URL (data:image/png;base64,...)", param, "invalid_image")
    if not limits.allow_remote:
        raise bad("this server does not fetch image URLs: send the image as a data: URL, or start the server with "
                  "--allow-remote-images", param, "remote_image_refused")
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "tinyllava"}),
                                    timeout=10) as reply:
            data = reply.read(limits.max_body + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise bad(f"could not fetch the image: {e}", param, "invalid_image") from None
    if len(data) > limits.max_body:
        raise bad(f"the image at that URL is larger than {limits.max_body} bytes", param, "invalid_image")
    return data


def decode_image(data, param, limits, pad):
    """An image file's bytes -> CLIP's pixels [3, 224, 224]: only PNG, JPEG and WebP, at most max_pixels, and the
    size read from the header before anything is decoded."""
    from PIL import Image

    from .image import preprocess
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in (*IMAGE_FORMATS.values(), "MPO"):    # MPO: a phone camera's JPEG
                raise bad(f"the data is a {img.format} image; this server reads PNG, JPEG and WebP", param,
                          "invalid_image")
            if img.width * img.height > limits.max_pixels:
                raise bad(f"the image is {img.width}x{img.height}, more than {limits.max_pixels:,} pixels "
                          f"(--max-image-pixels)", param, "image_too_large")
            img.load()
        return preprocess(img, pad=pad)
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bad("the image is too large, refused as a possible decompression bomb", param, "image_too_large")
    except Image.UnidentifiedImageError:
        raise bad("the data is not an image (PNG, JPEG or WebP)", param, "invalid_image") from None
    except (OSError, SyntaxError, ValueError, TinyLlavaError) as e:   # PIL's errors for a damaged image
        raise bad(f"not a readable image: {e}", param, "invalid_image") from None


# -- the model's thread ---------------------------------------------------------------------------------------------
class Cancelled(Exception):
    """The client went away: its answer stops here."""


class Stopped(Exception):
    """A stop string came: the answer ends before it."""


class StopText:
    """Text as it comes, held back while it could be the start of a stop string, cut where one appears."""

    def __init__(self, stops):
        self.stops, self.held = stops, ""

    def push(self, piece):  # -> the text that is safe to send; raises Stopped (with the text before) at a stop
        text = self.held + piece
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            raise Stopped(text[:min(cuts)])
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]


class Job:
    """One request on its way through the model. The model's thread puts events on `events`:
    ("start", prompt tokens), ("text", piece)..., then ("done", finish_reason, completion tokens), or ("error",
    APIError) before a start."""

    def __init__(self, request, pixels, keys):
        self.request, self.pixels, self.keys = request, pixels, keys
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.events = queue.Queue()
        self.cancelled = threading.Event()


class Engine:
    """The model and the one thread that runs it. Requests wait in a bounded queue, first come first served."""

    def __init__(self, llava, threads=1, queue_size=16, pad=True, max_tokens=Limits.max_tokens):
        self.llava, self.threads, self.capacity, self.pad = llava, threads, 1 + queue_size, pad
        self.max_tokens = max_tokens  # an answer's length when the request does not say
        self.cond = threading.Condition()
        self.waiting = deque()        # jobs ready to run, in order
        self.running = None           # the job the model is on
        self.reserved = 0             # places taken by requests whose images are still being read
        self.cancelled = 0            # answers given up because their client went away
        self.tokens = OrderedDict()   # sha256 of an image file -> its image tokens [196, d], most recent last
        self.decoding = threading.Semaphore(1)  # one image decoded at a time: a large photo is 100 MB or more
        threading.Thread(target=self.work, name="model", daemon=True).start()

    def reserve(self):  # a place in the queue, or 429
        with self.cond:
            if self.reserved + len(self.waiting) + (self.running is not None) >= self.capacity:
                raise APIError(429, f"the server is busy: one request is being answered and {self.capacity - 1} "
                               "are waiting (--queue); try again shortly", None, "rate_limit_exceeded")
            self.reserved += 1

    def submit(self, job):  # the reserved place becomes a job in the queue
        with self.cond:
            self.reserved -= 1
            self.waiting.append(job)
            self.cond.notify()

    def unreserve(self):
        with self.cond:
            self.reserved -= 1

    def cancel(self, job):  # its client went away: out of the queue at once, or stopped at its next token
        job.cancelled.set()
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
                self.cancelled += 1

    def close(self):  # the model's thread ends once the queue is empty (a server in a test, say)
        with self.cond:
            self.waiting.append(None)
            self.cond.notify()

    def status(self):
        with self.cond:
            return {"status": "ok", "running": int(self.running is not None),
                    "waiting": sum(job is not None for job in self.waiting), "cancelled": self.cancelled}

    def work(self):
        from . import fused, runtime
        runtime.use_threads(self.threads)  # numba's thread count is per thread: set in the thread that decodes
        while True:
            with self.cond:
                while not self.waiting:
                    self.cond.wait()
                job = self.running = self.waiting.popleft()
            if job is None:
                return
            runtime.adapt()  # unless --threads chose them, the threads follow the machine's load (runtime.py)
            try:
                self.answer(job)
            except Cancelled:
                with self.cond:
                    self.cancelled += 1
            except APIError as e:
                job.events.put(("error", e))
            except TinyLlavaError as e:  # the library's own refusal (a prompt it cannot take)
                job.events.put(("error", bad(str(e))))
            except Exception:  # noqa: BLE001 (a bug: logged here, a 500 to its client, the next one served)
                traceback.print_exc()
                job.events.put(("error", APIError(500, "the server failed on this request (its log says why)")))
            finally:
                with self.cond:
                    self.running = None
                fused.release_memory()    # the answer's KV cache and temporaries go back to the system

    def image_tokens(self, key, pixels):  # [3, 224, 224] -> [196, d], the vision tower run once per image
        if key not in self.tokens:
            self.tokens[key] = self.llava.image_tokens(pixels[None])[0]
            if len(self.tokens) > IMAGE_CACHE:
                self.tokens.popitem(last=False)
        self.tokens.move_to_end(key)
        return self.tokens[key]

    def answer(self, job):
        """What Llava.answer does (the same prompt, the same calls), with the counts, stop strings and
        cancelling that the API needs."""
        r, llava, eos = job.request, self.llava, self.llava.tok.eos_id
        if job.cancelled.is_set():
            raise Cancelled
        images = [self.image_tokens(k, px) for k, px in zip(job.keys, job.pixels)]
        if job.cancelled.is_set():    # (the vision tower takes seconds: the client may have left meanwhile)
            raise Cancelled
        # the markers are in the messages already (n_images=0): where the client put its images
        text = chat_prompt(llava.tok, r.question, 0, r.system or llava.system, r.history)
        x, _ = llava.embed(text, images)                                      # [1, T, d]
        T, context = x.shape[1], llava.decoder.cfg.context_length
        if T + (r.max_tokens or 1) > context:
            raise bad(f"the prompt is {T} tokens" + (f" and max_tokens {r.max_tokens}: together more than " if
                      r.max_tokens else ", as many as ") + f"the model's context of {context}", "messages",
                      "context_length_exceeded")
        n = r.max_tokens or min(self.max_tokens, context - T)
        job.events.put(("start", T))
        stops, count = StopText(r.stop), 0

        def on_step(step, logits):  # before each token is chosen
            nonlocal count
            if job.cancelled.is_set():
                raise Cancelled
            count = step + 1

        def on_text(piece):  # each token's text, then what the UTF-8 decoder held back
            piece = stops.push(piece)
            if piece:
                job.events.put(("text", piece))

        try:
            _, ids = llava.complete(x, Sampling(n, r.temperature, r.top_k, r.top_p, r.seed), on_text, on_step=on_step)
        except Stopped as s:
            if str(s):
                job.events.put(("text", str(s)))
            job.events.put(("done", "stop", count))
            return
        if stops.held:
            job.events.put(("text", stops.held))
        ended = ids[-1] == eos
        job.events.put(("done", "stop" if ended else "length", len(ids) - ended))


# -- HTTP ---------------------------------------------------------------------------------------------------------
def loopback(name):  # "localhost", or an address of this machine's loopback (127.0.0.0/8, ::1)
    try:
        return name.lower() == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:   # a name, such as 127.0.0.1.example.com
        return False


def page():  # the chat page, from the package's files
    return resources.files("tinyllava").joinpath("chat.html").read_bytes()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, limits, api_key=None, engine=None):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.engine, self.limits, self.api_key = engine, limits, api_key   # the engine may come after binding
        self.loopback = loopback(address[0])
        self.connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, Handler)

    def process_request(self, request, client_address):  # a thread per connection, up to MAX_CONNECTIONS
        if not self.connections.acquire(blocking=False):
            body = json.dumps(APIError(503, "too many open connections").body()).encode()
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive; a stream's length is unknown, so it goes out chunked
    server_version = "tinyllava"
    timeout = SOCKET_TIMEOUT

    # routing
    def do_GET(self):
        self.route({"/": self.chat_page, "/health": self.health, "/v1/models": self.models})

    def do_POST(self):
        self.route({"/v1/chat/completions": self.chat_completions})

    def route(self, table):
        self.body_read = self.command != "POST"
        self.streaming = False
        try:
            self.dispatch(table)
        except APIError as e:
            self.reply_error(e)
        except OSError:                  # the client went away, or stalled past the timeout
            self.close_connection = True
        except Exception:  # noqa: BLE001 (a bug: logged here, a 500 to the client, the server goes on)
            traceback.print_exc()
            self.reply_error(APIError(500, "the server failed on this request (its log says why)"))

    def dispatch(self, table):
        self.check_host()
        path = urlsplit(self.path).path
        if path not in table:
            known = path in ("/", "/health", "/v1/models", "/v1/chat/completions")
            raise APIError(405 if known else 404, f"{self.command} {path} is not served here" + (
                "" if known else ": the API is POST /v1/chat/completions, GET /v1/models"), None,
                "method_not_allowed" if known else "not_found")
        if path.startswith("/v1/"):
            self.check_key()
        table[path]()

    def reply_error(self, e):
        try:
            self.send_api_error(e)
        except OSError:
            self.close_connection = True

    def check_host(self):
        """On a loopback address, only requests addressed to it: a web page whose name is made to resolve to
        127.0.0.1 (DNS rebinding) sends its own name as Host, and is refused."""
        if not self.server.loopback:
            return
        host = self.headers.get("Host", "")
        name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        if not loopback(name):
            raise bad(f"the Host header '{host[:60]}' is not this server's loopback address", None, "invalid_host")

    def check_key(self):
        key = self.server.api_key
        if key and not hmac.compare_digest(self.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()):
            raise APIError(401, "a valid API key is needed: 'Authorization: Bearer KEY' (the server's --api-key)",
                           None, "invalid_api_key")

    # replies
    def send_json(self, status, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection or not self.body_read:   # an unread body would be taken for the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def send_api_error(self, e):
        if self.streaming:   # the 200 went out already: the error ends the stream, as OpenAI's does
            self.send_event({"error": e.body()["error"]})
            self.end_stream()
        else:
            self.send_json(e.status, e.body(), [("Allow", "GET, POST")] if e.status == 405 else ())

    def send_error(self, code, message=None, explain=None):  # http.server's own (a bad request line, ...)
        self.body_read, self.streaming, self.close_connection = False, False, True
        if code == HTTPStatus.NOT_IMPLEMENTED:  # a method it has no do_ for: the client's mistake, 405
            code, message = 405, f"the method {self.command[:20]!r} is not served here: GET or POST"
        self.send_api_error(APIError(code, message or HTTPStatus(code).phrase))

    def handle_expect_100(self):  # curl asks before it sends a large body: a body too large is refused unsent
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.server.limits.max_body:
            self.body_read, self.streaming = False, False
            self.send_api_error(self.too_large(int(length)))
            return False
        return super().handle_expect_100()

    def too_large(self, n):
        return APIError(413, f"the request is {n:,} bytes, more than this server takes ({self.server.limits.max_body:,}"
                        ", --max-body)", None, "request_too_large")

    def start_stream(self):
        self.chunked = self.request_version != "HTTP/1.0"   # HTTP/1.0 (nginx's proxy_pass): ended by closing
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")          # a proxy passes each event on as it comes
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.streaming = True

    def send_event(self, obj):  # one server-sent event, as one HTTP chunk
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def end_stream(self):
        if self.chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.streaming = False

    # the client's side of the connection
    def client_gone(self):
        """Has the client closed the connection? (Readable with nothing to read: its end of the stream.)"""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def read_json(self):
        if self.headers.get("Transfer-Encoding"):
            raise APIError(411, "send the body with a Content-Length (chunked request bodies are not read)", None,
                           "length_required")
        if self.headers.get_content_type() != "application/json":
            raise APIError(415, "the body must be JSON, sent with 'Content-Type: application/json'", None,
                           "unsupported_media_type")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise APIError(411, "the request needs a Content-Length", None, "length_required")
        if int(length) > self.server.limits.max_body:
            if int(length) <= 4 * self.server.limits.max_body:   # read and dropped, so that the client, still
                self.body_read = drain(self.rfile, int(length))   # sending, gets the 413 and not a broken pipe
            raise self.too_large(int(length))
        data = self.rfile.read(int(length))
        self.body_read = len(data) == int(length)
        if not self.body_read:
            raise bad("the request body ended before its Content-Length")
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise bad(f"the body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object", None, "invalid_json")
        return body

    # endpoints
    def chat_page(self):
        self.send_response(200)
        data = page()
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        # the page may talk to this server and nothing else, and may not be framed by another site
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src "
                         "'unsafe-inline'; img-src data: blob:; connect-src 'self'; frame-ancestors 'none'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        self.wfile.write(data)

    def health(self):
        self.send_json(200, self.server.engine.status())

    def models(self):
        self.send_json(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0,
                                                         "owned_by": "tinyllava"}]})

    def chat_completions(self):
        server, limits = self.server, self.server.limits
        r = parse_chat(self.read_json(), limits)
        server.engine.reserve()                       # a 429 costs nothing: before any image is decoded
        try:
            data = [image_bytes(url, param, limits) for url, param in r.images]
            with server.engine.decoding:
                pixels = [decode_image(d, param, limits, server.engine.pad) for d, (_, param) in zip(data, r.images)]
        except BaseException:
            server.engine.unreserve()
            raise
        job = Job(r, pixels, [hashlib.sha256(d).hexdigest() for d in data])
        server.engine.submit(job)
        try:
            (self.stream if r.stream else self.reply)(job)
        finally:
            server.engine.cancel(job)                 # nothing, if it ended; else give up its place or its answer

    def next_event(self, job):  # the job's next event; its error raised; Cancelled once the client has gone
        while True:
            try:
                event = job.events.get(timeout=POLL)
            except queue.Empty:
                if self.client_gone():
                    raise Cancelled from None
                continue
            if event[0] == "error":
                raise event[1]
            return event

    def reply(self, job):
        try:
            prompt = self.next_event(job)[1]
            pieces, event = [], self.next_event(job)
            while event[0] == "text":
                pieces.append(event[1])
                event = self.next_event(job)
        except Cancelled:
            self.close_connection = True
            return
        _, finish, completion = event
        self.send_json(200, {"id": job.id, "object": "chat.completion", "created": job.created, "model": MODEL_ID,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                          "logprobs": None, "finish_reason": finish}],
                             "usage": usage(prompt, completion)})

    def stream(self, job):
        def chunk(delta, finish=None):
            return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": MODEL_ID,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        try:
            prompt = self.next_event(job)[1]
            self.start_stream()
            self.send_event(chunk({"role": "assistant", "content": ""}))
            event = self.next_event(job)
            while event[0] == "text":
                self.send_event(chunk({"content": event[1]}))
                event = self.next_event(job)
            _, finish, completion = event
            self.send_event(chunk({}, finish))
            if job.request.include_usage:
                self.send_event({**chunk({}), "choices": [], "usage": usage(prompt, completion)})
            self.send_event(b"[DONE]")
            self.end_stream()
        except (Cancelled, OSError):     # gone: noticed while waiting, or when a write failed
            self.close_connection = True


def drain(f, n):  # read n bytes and drop them -> True if they all came
    while n > 0:
        got = len(f.read(min(n, 1 << 16)))
        if not got:
            return False
        n -= got
    return True


def usage(prompt, completion):
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -- the command ----------------------------------------------------------------------------------------------------
def parser():
    ap = argparse.ArgumentParser(
        prog="python -m tinyllava.serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__ + """
examples:
  python -m tinyllava.serve                              # the stage-2 model on http://127.0.0.1:8080/
  python -m tinyllava.serve --port 9000 --api-key SECRET --queue 4
  python -m tinyllava.serve --host 0.0.0.0 --api-key SECRET   # reachable from other machines: set a key
""")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8080, help="port (8080; 0: any free port, printed at start)")
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (default: the environment's "
                    "TINYLLAVA_API_KEY, if set; else no key)")
    add_model_options(ap)  # -m, --stage, --projector, --adapter, --crop, --fused, -t (options.py)
    d = Limits()
    ap.add_argument("--queue", type=int, default=d.queue, help=f"requests that may wait while one is answered "
                    f"({d.queue}); more get 429")
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"most tokens one answer may ask for "
                    f"({d.max_tokens})")
    ap.add_argument("--max-images", type=int, default=d.max_images, help=f"images in one request ({d.max_images})")
    ap.add_argument("--max-image-pixels", type=int, default=d.max_pixels, help=f"pixels of one image "
                    f"({d.max_pixels:,})")
    ap.add_argument("--max-body", type=int, default=d.max_body, help=f"bytes of one request ({d.max_body:,}); "
                    "more get 413")
    ap.add_argument("--allow-remote-images", action="store_true", help="fetch image_url parts that are http(s) "
                    "URLs (by default only data: URLs are read: a fetch could reach any address the server can)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    with cli_errors("tinyllava.serve"):
        from . import runtime
        from .model import load_llava
        least = {"port": 0, "queue": 0, "max_images": 0, "max_tokens": 1, "max_image_pixels": 1, "max_body": 1}
        for name, n in least.items():
            if getattr(args, name) < n:
                raise TinyLlavaError(f"--{name.replace('_', '-')} must be at least {n}")
        if args.port > 65535:
            raise TinyLlavaError("--port must be at most 65535")
        limits = Limits(args.max_body, args.max_images, args.max_image_pixels, args.max_tokens, args.queue,
                        args.allow_remote_images)
        try:  # first: a port in use fails at once, not after the model has loaded
            server = Server((args.host, args.port), limits, args.api_key or os.environ.get("TINYLLAVA_API_KEY"))
        except OSError as e:
            raise TinyLlavaError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
        compiling = runtime.CompileWatch(lambda: print("(first run: numba is compiling the fused loops for this CPU; "
                                                       "they are cached for later runs)", file=sys.stderr, flush=True))
        runtime.keep_freed_memory()
        threads = threads_option(args.threads)
        projector, adapter = model_files(args.stage, args.projector, args.adapter)
        llava = load_llava(projector, args.model, quantized=quantized(args.fused), adapter=adapter)
        runtime.use_threads(threads)
        llava.answer("Hi", sampling=Sampling(2))     # loads (or compiles) the decoding loops before the first client
        compiling.close()
        limits.context = llava.decoder.cfg.context_length
        server.engine = Engine(llava, threads, args.queue, not args.crop, args.max_tokens)
        host, port = server.server_address[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        chosen = f"{threads} thread(s)" if threads else f"{runtime.THREADS} thread(s) now, following the load"
        print(f"tinyllava.serve: listening on {url} (the chat page; the API under {url}v1/), {chosen}"
              + (", API key required" if server.api_key else ""), file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()


if __name__ == "__main__":
    main()

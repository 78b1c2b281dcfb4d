"""The OpenAI-compatible HTTP API (FastAPI) over an EngineLoop: models, completions, chat, health, metrics."""

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moe_engine.errors import MoeEngineError
from moe_engine.inputs import template_settings
from moe_engine.sampling import SamplingParams
from moe_engine.serve.loop import Busy, EngineLoop, Request


class APIError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers


def error_response(e: APIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


# Request fields: name -> (accepted Python types, description for the error).
NUMBER, INT = ((int, float), "a number"), ((int,), "an integer")
FIELDS = {"max_tokens": INT, "max_completion_tokens": INT, "temperature": NUMBER, "top_p": NUMBER, "top_k": INT,
          "min_p": NUMBER, "repetition_penalty": NUMBER, "seed": INT, "n": INT, "stream": ((bool,), "a boolean"),
          "echo": ((bool,), "a boolean"), "logprobs": ((bool, int), "a boolean or an integer"),
          "top_logprobs": INT, "stream_options": ((dict,), "an object"), "user": ((str,), "a string"),
          "model": ((str,), "a string"), "stop": ((str, list), "a string or a list of strings"),
          "ignore_eos": ((bool,), "a boolean"), "presence_penalty": NUMBER, "frequency_penalty": NUMBER}


def check_types(body: dict) -> None:
    for name, (types, what) in FIELDS.items():
        v = body.get(name)
        if v is None:
            continue
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            raise APIError(400, f"'{name}' must be {what}, got {json.dumps(v)[:40]}", name)


def template_inputs(body: dict) -> tuple[list | None, dict]:
    """A chat request's tools and chat_template_kwargs (vLLM's) for the chat template. Tool calls are not
    parsed out of the answer, so a tool_choice other than "auto"/"none" is refused."""
    tools, kwargs, choice = body.get("tools"), body.get("chat_template_kwargs"), body.get("tool_choice")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise APIError(400, f"'tools' must be a list of {{\"type\": \"function\", \"function\": {{...}}}} "
                            f"objects, got {json.dumps(tools)[:40]}", "tools")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise APIError(400, f"'chat_template_kwargs' must be an object, e.g. {{\"enable_thinking\": false}}, "
                            f"got {json.dumps(kwargs)[:40]}", "chat_template_kwargs")
    if choice is not None and choice not in ("auto", "none"):
        raise APIError(400, f"tool_choice={json.dumps(choice)[:60]} is not supported: this server does not parse "
                            'tool calls out of the answer; send "auto" or leave it out', "tool_choice")
    try:
        return tools, template_settings(kwargs)
    except MoeEngineError as e:
        raise APIError(400, str(e), "chat_template_kwargs") from None


def sampling_from(body: dict, default_max_tokens: int) -> SamplingParams:
    if body.get("n", 1) != 1:
        raise APIError(400, f"n={body['n']} is not supported: this server returns one choice per request (n=1)", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            raise APIError(400, f"{name} is not supported; use repetition_penalty instead", name)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    values = {"max_tokens": default_max_tokens if max_tokens is None else max_tokens,
              "temperature": 1.0 if body.get("temperature") is None else body["temperature"]}   # OpenAI's default
    for name in ("top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop", "ignore_eos"):
        if body.get(name) is not None:
            values[name] = body[name]
    try:
        return SamplingParams(**values)
    except MoeEngineError as e:
        param = next((n for n in values if f" {n}=" in f" {e}"), None)
        raise APIError(400, str(e), param) from None


def top_logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token a request asks for (None: no logprobs), checked against 0..20."""
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        want = lp is True or (lp not in (None, False) and lp != 0)
        k = top or 0
        if top is not None and not want:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    else:
        want, k = lp is not None and lp is not False, (0 if lp is True else lp or 0)
    if not want:
        return None
    if not 0 <= k <= 20:
        raise APIError(400, f"top_logprobs/logprobs={k} is out of range: must be 0..20", "top_logprobs")
    return k


def usage(req: Request, counts: dict | None) -> dict:
    completion, cached = (counts["completion_tokens"], counts["cached_tokens"]) if counts else (0, 0)
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": completion,
            "total_tokens": len(req.prompt_ids) + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def create_app(llm, served_model_name: str, api_key: str | None = None, max_waiting: int = 256,
               default_max_tokens: int = 256) -> FastAPI:
    """The app over an LLM (its engine runs in a thread of this process) or over a loop already made
    (an EngineProcess: the engine in a process of its own). The loop starts with the app and is at
    app.state.loop."""
    loop = EngineLoop(llm, max_waiting) if hasattr(llm, "engine") else llm

    @contextlib.asynccontextmanager
    async def lifespan(_):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="moe-engine", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.loop = loop

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e):
        return error_response(APIError(e.status_code, str(e.detail), type_="not_found_error"
                                       if e.status_code == 404 else "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _any_error(_, e):
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error"))

    def authorize(request: HTTPRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if given != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the --api-key "
                                "the server was started with", type_="authentication_error", code="invalid_api_key")

    async def parse(request: HTTPRequest) -> dict:
        authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        check_types(body)
        model = body.get("model")
        if model is not None and model != served_model_name:
            raise APIError(404, f"model '{model}' does not exist; this server serves '{served_model_name}'",
                           "model", code="model_not_found")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(await asyncio.to_thread(loop.metrics), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        authorize(request)
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "moe-engine", "max_model_len": loop.max_model_len}]}

    def tokenizer():
        if loop.tokenizer is None:
            raise APIError(400, f"the model at {loop.path} has no tokenizer; text requests need one")
        return loop.tokenizer

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await parse(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids, text = tokenizer().encode(prompt), prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            text = loop.tokenizer.decode(ids) if loop.tokenizer is not None and body.get("echo") else ""
        else:
            raise APIError(400, "'prompt' must be a string, a list of token ids, or a list of one of those", "prompt")
        echo = text if body.get("echo") else ""
        return await run(request, body, ids, "text_completion", echo)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await parse(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        tools, kwargs = template_inputs(body)
        plain = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):       # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise APIError(400, "only text content parts are supported", "messages")
                content = "".join(str(p.get("text", "")) for p in content)
            calls = m.get("tool_calls")
            if calls is not None and (not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)):
                raise APIError(400, "a message's 'tool_calls' must be a list of objects", "messages")
            if not isinstance(m.get("role"), str) or not (isinstance(content, str) or (calls and content is None)):
                raise APIError(400, "each message needs a string 'role' and a string 'content' (null only in an "
                                    "assistant message with 'tool_calls')", "messages")
            # the template sees the message's other fields too (tool_calls, tool_call_id, name, reasoning_content)
            plain.append({**m, "content": content or ""})     # null content renders empty, as in vLLM
        try:
            ids = tokenizer().encode_chat(plain, tools=tools, **kwargs)
        except MoeEngineError as e:
            raise APIError(400, str(e), "messages") from None
        except Exception as e:          # a template that raises on these messages (e.g. role order)
            raise APIError(400, f"the chat template refused these messages: {e}", "messages") from None
        return await run(request, body, ids, "chat.completion", "")

    async def run(request: HTTPRequest, body: dict, ids: list[int], kind: str, echo: str):
        params = sampling_from(body, default_max_tokens)
        stream = bool(body.get("stream"))
        req = Request(ids, params, stream, asyncio.get_running_loop())
        req.top_logprobs = top_logprobs(body, kind == "chat.completion")
        try:
            loop.submit(req)
        except Busy as e:
            raise APIError(503, str(e), type_="server_busy", code="server_busy", headers={"Retry-After": "1"}) from None
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not stream:
            return await collect(request, req, rid, created, kind, echo)
        first = await req.events.get()          # a refused prompt answers 400 before any stream starts
        if first[0] == "error":
            raise APIError(400, first[1], "messages" if kind == "chat.completion" else "prompt")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(sse(req, first, rid, created, kind, echo, include_usage),
                                 media_type="text/event-stream")

    async def collect(request, req, rid, created, kind, echo):
        text, finish, logprobs, token_ids, counts = "", None, None, [], None
        try:
            while finish is None:
                event = await req.events.get()
                if event[0] == "error":
                    raise APIError(400, event[1], "messages" if kind == "chat.completion" else "prompt")
                if event[0] == "delta":
                    text, token_ids = text + event[1], token_ids + event[2]
                elif event[0] == "logprobs":
                    logprobs = format_logprobs(req.prompt_ids, token_ids, *event[1:], kind == "chat.completion",
                                               len(echo))
                else:
                    finish, counts = event[1], event[2]
        finally:
            if finish is None:
                loop.cancel(req)
        base = {"id": rid, "object": kind, "created": created, "model": served_model_name,
                "usage": usage(req, counts)}
        if kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": echo + text, "logprobs": logprobs, "finish_reason": finish}
        return {**base, "choices": [choice]}

    async def next_event(req):
        """The next event; deltas that piled up while the client was being written to go out as one chunk."""
        event = await req.events.get()
        while event[0] == "delta" and not req.events.empty():
            following = req.events.get_nowait()
            if following[0] != "delta":
                req.events.put_nowait(following)      # "done"/"error" comes last: putting it back keeps order
                break
            event = ("delta", event[1] + following[1], event[2] + following[2]) + (
                ((event[3][0] + following[3][0], event[3][1] + following[3][1]),) if len(event) > 3 else ())
        return event

    def format_logprobs(context, token_ids, chosen, tops, chat_kind, offset):
        """OpenAI's logprobs object for token_ids, which follow the ids in context. Each token's text is
        read in context: sentencepiece spells a word's leading space only after another token."""
        tok, ctxs = loop.tokenizer, []
        context = list(context[-4:])
        for t in token_ids:
            ctxs.append(context)
            context = (context + [t])[-4:]

        def piece(ctx, i):
            return str(i) if tok is None else tok.decode_continuation(ctx, [i])

        words = [piece(c, t) for c, t in zip(ctxs, token_ids)]
        alts = [[(piece(c, i), v) for i, v in top] for c, top in zip(ctxs, tops)]
        if chat_kind:
            return {"content": [{"token": w, "logprob": lp, "bytes": list(w.encode()),
                                 "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode())} for a, v in top]}
                                for w, lp, top in zip(words, chosen, alts)]}
        offsets, at = [], offset
        for w in words:
            offsets.append(at)
            at += len(w)
        return {"tokens": words, "token_logprobs": chosen, "text_offset": offsets,
                "top_logprobs": [dict(top) for top in alts]}

    async def sse(req, event, rid, created, kind, echo, include_usage):
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        chat_kind = kind == "chat.completion"

        offset, streamed, counts = len(echo), [], None     # characters and token ids streamed so far

        def chunk(text, finish=None, role=False, logprobs=None):
            if chat_kind:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})
                choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
            body = {"id": rid, "object": chunk_kind, "created": created, "model": served_model_name,
                    "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        finish = None
        try:
            if chat_kind:
                yield chunk("", role=True)
            elif echo:
                yield chunk(echo)
            pending = ""                    # chunks not yet written: what is ready goes out in one write
            while True:
                if event[0] == "delta":
                    logprobs = None
                    if len(event) > 3 and event[2]:
                        before = req.prompt_ids + streamed
                        logprobs = format_logprobs(before, event[2], *event[3], chat_kind, offset)
                        offset += sum(len(w) for w in logprobs.get("tokens", []))
                    streamed += event[2]
                    if event[1] or logprobs:
                        pending += chunk(event[1], logprobs=logprobs)
                elif event[0] == "done":
                    finish, counts = event[1], event[2]
                    break
                else:                       # an engine failure mid-stream: say so, then end the stream
                    pending += f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error'}})}\n\n"
                    finish = "error"
                    break
                if pending and req.events.empty():
                    yield pending
                    pending = ""
                event = await next_event(req)
            # The end in one write: the finish chunk (not after an error), the usage chunk, [DONE].
            tail = pending + (chunk("", finish) if finish != "error" else "")
            if include_usage:
                body = {"id": rid, "object": chunk_kind, "created": created, "model": served_model_name,
                        "choices": [], "usage": usage(req, counts)}
                tail += f"data: {json.dumps(body)}\n\n"
            yield tail + "data: [DONE]\n\n"
        finally:
            if finish is None:              # the client went away (or the server is stopping)
                loop.cancel(req)

    return app

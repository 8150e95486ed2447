"""OpenAIIngress: the FastAPI front door of the Serve application.

Routes: POST /v1/chat/completions, POST /v1/completions (SSE streaming and not), GET /v1/models,
GET /health. For every model route: API key → body size → JSON → validation → LLMServer stream →
reasoning split → response. Every refusal is a 4xx/5xx with an OpenAI-style error body; nothing
here answers 500 for a bad request, and every wait on the LLM server has a deadline.
"""


import asyncio
import dataclasses
import json
import logging
import threading
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.exceptions import BackPressureError

from actors import metrics
from actors.session_store import SESSION_HEADER, SessionClient, token_counting
from actors.tracing import setup_actor_tracing
from cluster.serve.codegen import run_code_loop
from cluster.serve.screening import OutputScreen, Screening
from r1.chat_template import continued_message, continues_reasoning
from r1.config import ServeConfig
from r1.metrics import GenerationTimer
from r1.model import load_tokenizer
from r1.reasoning import ReasoningParser
from r1.serving.auth import APIKeyChecker, load_key_digests, refuse_open_api
from r1.serving.logprobs import (
    Entry,
    LogprobLedger,
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    token_id_name,
)
from r1.serving.responses import (
    ResponseEvents,
    ResponsesRequest,
    chat_request,
    input_items,
    page_of_items,
    read_stored_response,
    responses_error,
)
from r1.serving.tools import ToolCallStream, ToolPlan, call_text, tools_prompt, with_tools_prompt
from r1.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_choice,
    chat_chunk,
    chat_messages,
    chat_response,
    choice_seed,
    completion_choice,
    completion_chunk,
    completion_prompts,
    completion_response,
    constraint_param,
    decode_json,
    model_object,
    models_list,
    new_id,
    parse_request,
    request_tools,
    sampling_for,
    tokenize,
    tool_sampling,
    total_cached,
    unsupported,
    usage_dict,
)
from r1.sessions import pending_session
from r1.sessions.store import MAX_DATA_CHARS
from r1.telemetry import (
    TRACE_ID_HEADER,
    TRACEPARENT_HEADER,
    end_span,
    inject_context,
    span,
    start_span,
    trace_id_from_traceparent,
    trace_id_of,
    use_span,
)

logger = logging.getLogger("ray.serve")
# The status a request that the client abandoned mid-stream is recorded with (nginx's convention;
# the client already got 200 and never reads it).
CLIENT_CLOSED_REQUEST = 499
# How much of a completion's prompt's end goes to output screening as context: more than a filter
# ever uses (four times its left-context window, under 66,000 characters even with the longest
# match custom regex rules allow); every token is at least one character.
CONTINUED_CHARS = 131072
# Text shorter than this is tokenized on the event loop (under 0.2 ms, about a thread hop's cost).
SHORT_TEXT_CHARS = 512
app = FastAPI(title="r1-cluster", description="OpenAI-compatible API for DeepSeek-R1-style reasoning models")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(status_code=error.status, content=error.body())


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404) and wrong methods (405) answer with an OpenAI-style error body too."""
    if error.status_code == 404:
        message = (f"no route {request.url.path}; this server has /v1/chat/completions, /v1/completions, /v1/responses, "
                   "/v1/models, /v1/sessions/{id}, /tokenize, /detokenize, /health")
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(error.detail)
    response = error_response(APIError(error.status_code, message))
    for name, value in (error.headers or {}).items():
        response.headers[name] = value
    return response


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode("utf-8")


def _merged(item: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """Two consecutive delta items of one stream as one."""
    merged = {**later, "text": item["text"] + later["text"], "num_tokens": item["num_tokens"] + later["num_tokens"]}
    if "usage" not in later and "usage" in item:
        merged["usage"] = item["usage"]
    if "logprobs" in item:
        merged["logprobs"] = item["logprobs"] + later.get("logprobs", [])
    for key in ("prompt_logprobs", "echo_chars"):  # an echoing start item's (see `_Choice.count`)
        if key in item:
            merged[key] = item[key]
    return merged


class _Choice:
    """Collects one choice's stream: output screening, reasoning split, usage, log-probabilities."""

    def __init__(self, split_reasoning: bool, think_prefilled: bool, screen: OutputScreen, logprobs: bool = False,
                 tools: ToolPlan | None = None, continuing: bool = False):
        # continuing: the reply goes on from a prefix message (its start kept as it is).
        self.parser = ReasoningParser(think_prefilled, continuing) if split_reasoning else None
        # The answer's tool calls (a request offering tools): found in the screened content after the reasoning.
        self.calls = ToolCallStream(tools) if tools is not None else None
        self.unsent_calls: list[dict[str, Any]] = []  # a stream's: made, not yet in a chunk
        self.screen = screen
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None  # the stop string or stop token id that ended it
        self.prompt_tokens = 0  # its prompt's tokens on the first choice of each prompt, else 0
        # Of those, the ones the engine's prefix cache held (None: an engine that does not say).
        self.cached_tokens: int | None = 0
        self.completion_tokens = 0
        self.timer: GenerationTimer | None = None  # choice 0 only: the request's TTFT / TPOT
        # Token log-probabilities (when asked for): held until the screening has passed their text.
        self.ledger = LogprobLedger() if logprobs else None
        self.logprobs: list[Entry] = []  # released so far
        self.text_offset = 0  # a completion's: characters of the released entries' tokens so far
        self.tokens_as_ids = False  # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:N"
        # vLLM's continuous_usage_stats: its prompt's tokens, and every chunk carries the choice's usage.
        self.own_prompt_tokens: int | None = None

    def usage_so_far(self) -> dict[str, int] | None:
        """The choice's usage up to now (continuous_usage_stats), else None."""
        if self.own_prompt_tokens is None:
            return None
        return usage_dict(self.own_prompt_tokens, self.completion_tokens, self.cached_tokens)

    def _split(self, text: str) -> tuple[str, str]:
        reasoning, content = self.parser.feed(text) if self.parser else ("", text)
        if self.calls is not None:
            content = self.calls.feed(content)
        self.reasoning.append(reasoning)
        self.content.append(content)
        return reasoning, content

    def count(self, item: dict[str, Any]) -> None:
        """Book a stream item: its tokens, timing, finish reason and logprobs (held for its text)."""
        self.completion_tokens += item["num_tokens"]
        if self.timer is not None:
            self.timer.tokens_arrived(item["num_tokens"])
        if item["finish_reason"] is not None:
            self.finish_reason = item["finish_reason"]
            self.stop_reason = item.get("stop_reason")
        if self.ledger is not None:
            chars = len(item["text"])
            if "prompt_logprobs" in item:  # the echoed prompt opens the text: its tokens' entries first
                echo, prompt = item["echo_chars"], item["prompt_logprobs"]
                self.ledger.add(prompt, echo, split=sum(entry[3] for entry in prompt) == echo)
                chars -= echo
            self.ledger.add(item.get("logprobs"), chars)

    def _release(self, final: bool) -> list[Entry]:
        if self.ledger is None:
            return []
        screen = self.screen
        entries = self.ledger.release(screen.screened_chars, screen.withheld_spans, screen.blocked, final)
        self.logprobs += entries
        return entries

    async def feed(self, text: str) -> tuple[str, str, list[Entry]]:
        """Screen generated text, then split it; only screened text is kept or returned, with the
        log-probabilities of the tokens the screening has passed."""
        return *self._split(await self.screen.feed(text)), self._release(final=False)

    async def finish(self, text: str = "") -> tuple[str, str, list[Entry]]:
        """Screen the last generated text with whatever the screen still holds (one call), split it,
        and end the reasoning split."""
        held_reasoning, held_content = self._split(await self.screen.finish(text))
        reasoning, content = self.parser.finish() if self.parser else ("", "")
        if self.calls is not None:
            content = self.calls.feed(content) + self.calls.finish()
            self.unsent_calls = self.calls.calls
            if self.tool_calls and self.finish_reason == "stop" and self.calls.plan.mode != "named":
                self.finish_reason = "tool_calls"  # a named choice ends with "stop", as OpenAI's does
        self.reasoning.append(reasoning)
        self.content.append(content)
        return held_reasoning + reasoning, held_content + content, self._release(final=True)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The answer's calls, once it is finished (none for a request that offered no tools)."""
        return self.calls.calls if self.calls is not None else []

    def answer(self) -> str:
        """The whole content; beside tool calls without the whitespace that led up to them."""
        content = "".join(self.content)
        return content.strip() if self.tool_calls else content

    def stored_reply(self) -> str:
        """The answer as a stored conversation keeps it: its text, and its calls as the model writes them."""
        answer = self.answer()
        calls = [call_text(call["function"]["name"], call["function"]["arguments"]) for call in self.tool_calls]
        return "\n".join(([answer] if answer else []) + calls)


def _list_limit(value: str | None) -> int:
    """A list route's `limit` query parameter: 1 to 100, 20 when not given (OpenAI's)."""
    if value is None:
        return 20
    if not value.isdigit() or not 1 <= int(value) <= 100:
        raise APIError(400, f"limit must be an integer from 1 to 100, not {value[:32]!r}", param="limit",
                       code="invalid_value")
    return int(value)


def _response_not_stored(response_id: str) -> APIError:
    """The 404 of the stored-response routes (GET and DELETE /v1/responses/{id})."""
    return APIError(404, f"response '{response_id[:64]}' is not stored", param="response_id", code="response_not_found")


def _stored_data(events: ResponseEvents | None) -> str | None:
    """What a turn keeps beside its exchange (the session's `data`): a Responses request's finished
    response, none for a chat turn."""
    return None if events is None else events.stored_data(MAX_DATA_CHARS)


def _usage(choices: list[_Choice]) -> dict[str, Any]:
    """The request's usage: each prompt's tokens once, however many choices it has, and every
    choice's completion tokens."""
    return usage_dict(sum(c.prompt_tokens for c in choices), sum(c.completion_tokens for c in choices),
                      total_cached([c.cached_tokens for c in choices]))


@serve.deployment(name="OpenAIIngress")
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, llm: Any, code_validator: Any, safety: Any, config: dict[str, Any]):
        setup_actor_tracing("ingress")
        metrics.start_resource_reporter("ingress")
        self.llm = llm
        self.code_validator = code_validator  # None when the server runs without code validation
        self.config = ServeConfig.model_validate(config)
        self.screen = Screening(safety, self.config.safety)
        # To screen token-id prompts, and to refuse prompts that cannot fit before screening them.
        self.tokenizer = load_tokenizer(self.config.model)
        self.token_texts = TokenTexts(self.tokenizer)  # the token names of logprobs
        count_tokens, self.context_tokens = token_counting(self.config.model, self.tokenizer)  # no weights
        self.auth = APIKeyChecker(load_key_digests(self.config.api_keys_env, self.config.api_keys_file))
        refuse_open_api(self.config.require_api_keys, self.auth.enabled, self.config.api_keys_env)
        self.created = int(time.time())
        self._background: set[asyncio.Future] = set()  # session clean-ups of failed turns (see _keep)
        self.sessions = None
        if self.config.sessions.enabled:
            self.sessions = SessionClient(self.config.sessions, count_tokens=count_tokens, context_tokens=self.context_tokens)
            self.sessions.start_actors()  # now, not inside the first requests that reach each partition
        if not self.auth.enabled:
            logger.warning("no API keys configured (%s / api_keys_file): the API is open to anyone who can reach it",
                           self.config.api_keys_env)

    # -- routes --------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def answer(*_: Any) -> Response:
            self.auth.check(request.headers.get("authorization"))
            return JSONResponse(models_list(self.config.model_name, self.created, self.context_tokens,
                                            list(self.config.engine.lora_adapters)))

        return await self._traced(request, "models", answer)

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> Response:
        async def answer(*_: Any) -> Response:
            self.auth.check(request.headers.get("authorization"))
            adapter = self._check_model(model_id)
            return JSONResponse(model_object(model_id, self.created, self.context_tokens,
                                             None if adapter is None else self.config.model_name))

        return await self._traced(request, "models", answer)

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        """Token ids of a prompt or of chat messages, as the engine would see them (vLLM's route)."""
        async def answer(*_: Any) -> Response:
            parsed = await self._model_request(request, TokenizeRequest)
            tokens = await asyncio.to_thread(tokenize, self.tokenizer, parsed, self.config)
            return JSONResponse({"count": len(tokens), "max_model_len": self.context_tokens, "tokens": tokens})

        return await self._traced(request, "tokenize", answer)

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        """Text of token ids (vLLM's route)."""
        async def answer(*_: Any) -> Response:
            parsed = await self._model_request(request, DetokenizeRequest)
            self._check_token_ids(parsed.tokens, "tokens")
            return JSONResponse({"prompt": await asyncio.to_thread(self.tokenizer.decode, parsed.tokens)})

        return await self._traced(request, "detokenize", answer)

    async def _model_request(self, request: Request, kind: type) -> Any:
        """The request's body as `kind`, for a caller with a valid key, naming this server's model."""
        self.auth.check(request.headers.get("authorization"))
        parsed = parse_request(kind, await self._read_json(request))
        self._check_model(parsed.model)
        return parsed

    def _check_model(self, model: str) -> str | None:
        """The LoRA adapter `model` names (None: the base model); 404 for a model not served here."""
        if model == self.config.model_name:
            return None
        if model in self.config.engine.lora_adapters:
            return model
        served = ", ".join(repr(name) for name in (self.config.model_name, *self.config.engine.lora_adapters))
        raise APIError(404, f"model '{model}' does not exist; this server serves {served}",
                       param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, chat=False)

    @app.post("/v1/responses")
    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API: a chat request in other words (r1/serving/responses.py)."""
        return await self._handle(request, chat=True, responses=True)

    @app.get("/v1/responses/{response_id}")
    async def get_response(self, response_id: str, request: Request) -> Response:
        """A stored response as it was answered (`client.responses.retrieve`)."""
        async def answer(*_: Any) -> Response:
            owner = self.auth.check(request.headers.get("authorization"))
            stored = await self.sessions.read(response_id, owner) if self.sessions is not None else None
            if stored is None or stored.data is None:  # a chat session of that id holds no response
                raise _response_not_stored(response_id)
            return JSONResponse(read_stored_response(stored.data)[0])

        return await self._traced(request, "responses", answer)

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(self, response_id: str, request: Request) -> Response:
        """A stored response's input items (`client.responses.input_items.list`), as screened, a
        page at a time: `limit` (1-100, default 20), `order` (asc or desc, the default), `after` /
        `before` an item id."""
        async def answer(*_: Any) -> Response:
            owner = self.auth.check(request.headers.get("authorization"))
            query = request.query_params
            limit, order = _list_limit(query.get("limit")), query.get("order", "desc")
            if order not in ("asc", "desc"):
                raise APIError(400, f"order must be asc or desc, not {order[:32]!r}", param="order", code="invalid_value")
            if query.get("include"):
                raise APIError(400, "include is not supported; omit it", param="include", code="unsupported")
            stored = await self.sessions.read(response_id, owner) if self.sessions is not None else None
            if stored is None or stored.data is None:
                raise _response_not_stored(response_id)
            items = read_stored_response(stored.data)[1]
            if items is None:
                raise APIError(404, f"the input items of response '{response_id[:64]}' were not kept (too large, or "
                               "stored by an earlier r1-cluster)", param="response_id", code="response_not_found")
            return JSONResponse(page_of_items(items, limit, order, query.get("after"), query.get("before")))

        return await self._traced(request, "responses", answer)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(self, response_id: str, request: Request) -> Response:
        """Forget a stored response (`client.responses.delete`): it can no longer be continued."""
        async def answer(*_: Any) -> Response:
            owner = self.auth.check(request.headers.get("authorization"))
            if self.sessions is None or not await self.sessions.remove(response_id, owner):
                raise _response_not_stored(response_id)
            return JSONResponse({"id": response_id, "object": "response", "deleted": True})

        return await self._traced(request, "responses", answer)

    @app.get("/v1/sessions/{session_id}")
    async def get_session(self, session_id: str, request: Request) -> Response:
        async def answer(*_: Any) -> Response:
            owner = self.auth.check(request.headers.get("authorization"))
            return JSONResponse(await self._session_client().history(session_id, owner))

        return await self._traced(request, "sessions", answer)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(self, session_id: str, request: Request) -> Response:
        async def answer(*_: Any) -> Response:
            owner = self.auth.check(request.headers.get("authorization"))
            return JSONResponse(await self._session_client().delete(session_id, owner))

        return await self._traced(request, "sessions", answer)

    async def _traced(self, request: Request, route: str, answer: Any) -> Response:
        """One request = one trace and one count in the request metrics, on every route. The
        "request" span continues an incoming traceparent, is current while `answer(root, timer)`
        runs (every call inside passes `inject_context()`), and ends with the response, or with the
        last byte of a streamed body (which ends it itself). An APIError becomes its error response."""
        timer = GenerationTimer()
        root = start_span("request", request.headers, route=route)
        try:
            with use_span(root):
                try:
                    response = await answer(root, timer)
                except APIError as error:
                    response = error_response(error)
        except BaseException as error:
            end_span(root, error)
            metrics.record_request(route, 500, timer.elapsed_s())
            raise
        trace_id = trace_id_of(root) or trace_id_from_traceparent(request.headers.get(TRACEPARENT_HEADER))
        if trace_id:
            response.headers[TRACE_ID_HEADER] = trace_id
        if not isinstance(response, StreamingResponse):
            end_span(root, **{"http.status_code": response.status_code})
            metrics.record_request(route, response.status_code, timer.elapsed_s())
        return response

    async def _plan_response(self, events: ResponseEvents, previous: Any, owner: str | None, messages: list[dict[str, str]],
                             max_new_tokens: int) -> tuple[list[dict[str, str]], Any]:
        """A Responses request's prompt (the stored conversation's window, then its messages) and the
        turn that stores it (None for store: false) under the response's id with its answer, after
        the part of the stored conversation a continuation can show: the window, so the storage of
        each response stays bounded however long the chain."""
        planned = await self.sessions.plan(previous or pending_session(owner or ""), messages, max_new_tokens)
        if events.request.store is False:
            return planned.prompt, None
        window = self.sessions.config.window_messages
        kept = previous.messages[-window:] if previous is not None and window else []
        events.stored = True
        return planned.prompt, dataclasses.replace(planned, session_id=events.id, created=True, pending=True,
                                                   new_messages=[*kept, *planned.new_messages])

    async def _stored_response(self, response_id: str, owner: str | None) -> Any:
        """The stored conversation of a response (a `previous_response_id`); 404 when it is not stored."""
        if self.sessions is None:
            raise APIError(400, "responses are not stored on this server (sessions.enabled=false); send the whole "
                           "conversation as input", param="previous_response_id", code="unsupported")
        stored = await self.sessions.read(response_id, owner)
        if stored is None:
            raise APIError(404, f"response '{response_id[:64]}' is not stored: it does not exist, has expired, was "
                           "deleted or was created with store: false", param="previous_response_id",
                           code="response_not_found")
        return stored

    def _session_client(self) -> SessionClient:
        if self.sessions is None:
            raise APIError(404, "sessions are disabled on this server (sessions.enabled=false)", code="sessions_disabled")
        return self.sessions

    # -- the request path ------------------------------------------------------------------------
    async def _handle(self, request: Request, chat: bool, responses: bool = False) -> Response:
        route = "responses" if responses else "chat" if chat else "completions"
        return await self._traced(request, route,
                                  lambda root, timer: self._respond(request, chat, route, root, timer, responses))

    async def _respond(self, request: Request, chat: bool, route: str, root: Any, timer: GenerationTimer,
                       responses: bool = False) -> Response:
        turn = None
        wanted = None  # the Responses request, whose fields errors then name

        def failed(error: APIError) -> Response:
            self._abandon(turn)
            return error_response(error if wanted is None else responses_error(error, wanted))

        events = None  # a Responses request's response
        previous = None  # the stored conversation a Responses request continues (previous_response_id)
        try:
            owner = self.auth.check(request.headers.get("authorization"))
            body = await self._read_json(request)
            if responses:
                wanted = parse_request(ResponsesRequest, body)
                parsed = chat_request(wanted)
                events = ResponseEvents(wanted, wanted.model)
            else:
                parsed = parse_request(ChatCompletionRequest if chat else CompletionRequest, body)
            unsupported(parsed)
            adapter = self._check_model(parsed.model)
            sampling = sampling_for(parsed, self.config)
            root.set_attributes({"n": parsed.n, "stream": bool(parsed.stream), "model": parsed.model})
            continued = responses and wanted.previous_response_id is not None
            named_session = parsed.session_id is not None or request.headers.get(SESSION_HEADER) is not None
            if responses and (named_session or body.get("session_id") is not None):
                # Not a Responses field; ignoring it would drop the conversation the client means to continue.
                raise APIError(400, "session_id is for /v1/chat/completions; on /v1/responses continue a stored "
                               "response with previous_response_id", param="session_id")
            # A tool message may answer a call stored in the conversation it continues.
            messages = chat_messages(parsed, self.config, stored_calls=continued or named_session) if chat else None
            if continued:
                previous = await self._stored_response(wanted.previous_response_id, owner)
            plan = request_tools(parsed) if chat else None
            if plan is not None:
                sampling = tool_sampling(parsed, plan, sampling, self.config.engine.engine)
            if chat and continued_message(messages) is not None:  # the reply continues the last message
                for param, asked in (("tools", plan is not None), ("code_validation", parsed.code_validation)):
                    if asked:
                        raise APIError(400, f"{param} cannot be combined with a continued last message (prefix, "
                                       "continue_final_message)", param=param, code="invalid_value")
            opening = None
            # A chat session (not for Responses requests: stored under their response's id, below).
            if chat and self.sessions is not None and not responses:
                # Opening the session sends the store no message text and needs nothing from the
                # checks below, so it runs alongside them (one hop fewer before the model); the
                # screened messages are planned into it after. Its errors come after the checks'.
                # A request that names no session gets a new one without a call to the store.
                opening = asyncio.ensure_future(self.sessions.open_session(
                    parsed.session_id, request.headers.get(SESSION_HEADER), owner, messages))
            try:
                if chat:
                    offered = tools_prompt(plan) if plan is not None else ""  # screened as `tools`
                    await self._check_prompt_fits(with_tools_prompt(messages, offered), "messages")
                    messages, offered = await self.screen.input_messages(messages, offered)
                    if events is not None:  # stored with the response: the screened input only
                        events.input_items = input_items(wanted, messages)
                    prompts = [with_tools_prompt(messages, offered)]
                else:  # one prompt, or a batch of them
                    prompts, params = completion_prompts(parsed, self.config)
                    for prompt, param in zip(prompts, params):
                        if isinstance(prompt, list):
                            self._check_token_ids(prompt, param)
                        await self._check_prompt_fits(prompt, param)
                    prompts = await self.screen.input_prompts(prompts, params, self.tokenizer)
                # Shielded: a client that goes away now must not cancel the open halfway (a session
                # it created would stay behind); _drop_opening removes that session once it is open.
                session = await asyncio.shield(opening) if opening is not None else None
            except BaseException:
                self._drop_opening(opening)
                raise
            if session is not None:
                turn = await self.sessions.plan(session, prompts[0], sampling.max_new_tokens)
                prompts = [turn.prompt]
            elif responses and self.sessions is not None and (previous is not None or wanted.store is not False):
                prompt, turn = await self._plan_response(events, previous, owner, prompts[0], sampling.max_new_tokens)
                prompts = [prompt]
            elif named_session:
                # The header form too: a session the client names must not be ignored without a word.
                raise APIError(400, "session_id is only supported on /v1/chat/completions with sessions enabled",
                               param="session_id")
            if chat and parsed.code_validation:
                return await self._code_validation(parsed, prompts[0], sampling, turn, adapter)
            # `n` choices per prompt; choice j of each prompt is seeded as choice j of a request
            # holding that prompt alone, so a batch answers as one request per prompt would.
            streams = [self._open(prompt, chat, sampling, index, adapter) for prompt in prompts for index in range(parsed.n)]
            starts = await self._first_items(streams)
        except APIError as error:
            return failed(error)
        except asyncio.CancelledError:  # the client went away
            self._abandon(turn)
            raise
        response_id = new_id("chatcmpl" if chat else "cmpl")
        think_prefilled = bool(starts[0].get("think_prefilled"))
        prefill = continued_message(messages) if chat else None  # as screened
        if prefill is not None:  # the reply goes on from it: reasoning only when it stopped inside the reasoning
            think_prefilled = continues_reasoning(prefill)
        echo = not chat and parsed.echo
        if echo:
            # The prompt (as screened for input) opens each choice's text and goes through its output
            # screening like the generated text, so output-only rules apply to it too.
            for index, start in enumerate(starts):
                prompt = prompts[index // parsed.n]
                echoed = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
                start["text"], start["echo_chars"] = echoed + start["text"], len(echoed)
        choices = [_Choice(chat, think_prefilled, self.screen.output_stream(
            self._screening_context(chat, echo, prompts[index // parsed.n], prefill)), sampling.logprobs is not None,
            plan, continuing=prefill is not None) for index in range(len(streams))]
        choices[0].timer = timer
        options = parsed.stream_options
        for index, (choice, start) in enumerate(zip(choices, starts)):
            choice.prompt_tokens = start["prompt_tokens"] if index % parsed.n == 0 else 0
            choice.cached_tokens = start.get("cached_tokens") if index % parsed.n == 0 else 0
            choice.tokens_as_ids = bool(parsed.return_tokens_as_token_ids)
            if options is not None and options.include_usage and options.continuous_usage_stats:
                choice.own_prompt_tokens = start["prompt_tokens"]
        headers = {SESSION_HEADER: turn.session_id} if turn and not responses else {}
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return StreamingResponse(
                self._stream_body(streams, starts, choices, response_id, chat, include_usage, turn, root, route,
                                  parsed.model, events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", **headers},
            )
        try:
            await self._drain(streams, starts, choices)
            answered = await self._response_object(events, choices) if events is not None else None
            if turn is not None:  # a stored response keeps its object, for GET /v1/responses/{id}
                await self.sessions.finish_turn(turn, choices[0].stored_reply(), _stored_data(events))
        except APIError as error:
            return failed(error)
        except asyncio.CancelledError:
            self._abandon(turn)
            raise
        self._record_generation(route, root, choices, parsed.model)
        if answered is not None:
            return JSONResponse(answered)
        usage = await self._chat_usage(choices) if chat else _usage(choices)
        if chat:
            body_choices = [chat_choice(i, "".join(c.reasoning), c.answer(), c.finish_reason,
                                        self._logprobs(chat, c, c.logprobs), c.tool_calls, c.stop_reason)
                            for i, c in enumerate(choices)]
            extra = {"session_id": turn.session_id} if turn else {}
            return JSONResponse(chat_response(response_id, parsed.model, body_choices, usage, **extra),
                                headers=headers)
        body_choices = [completion_choice(i, "".join(c.content), c.finish_reason, self._logprobs(chat, c, c.logprobs),
                                          c.stop_reason)
                        for i, c in enumerate(choices)]
        return JSONResponse(completion_response(response_id, parsed.model, body_choices, usage))

    async def _code_validation(self, parsed: ChatCompletionRequest, prompt: list[dict[str, str]], sampling: Any,
                               turn: Any, adapter: str | None) -> Response:
        """Generate code for the last user message, validate it in the sandbox, repair on failure."""
        if self.code_validator is None or self.config.code_validator is None:
            raise APIError(400, "code validation is disabled on this server (code_validator: null)",
                           param="code_validation")
        if parsed.stream:
            raise APIError(400, "code_validation does not support stream=true; the answer is known only after "
                           "validation", param="stream")
        if parsed.n != 1:
            raise APIError(400, "code_validation supports n=1 only", param="n")
        if parsed.logprobs:
            raise APIError(400, "code_validation does not return logprobs; omit logprobs", param="logprobs")
        constrained = constraint_param(parsed)
        if constrained is not None:
            raise APIError(400, f"code_validation answers with code, not constrained text; omit {constrained}",
                           param=constrained)
        if parsed.tests is not None:
            from r1.codecheck.harness import parse_tests

            if not parsed.tests:
                raise APIError(400, "tests is empty; give at least one test, or leave tests out and the model "
                               "writes them", param="tests")
            try:  # malformed tests are the request's fault: refused before any generation
                parse_tests(parsed.tests)
            except ValueError as error:
                raise APIError(400, f"tests: {error}", param="tests") from None
        task = prompt[-1]["content"]
        cancelled = threading.Event()
        with span("code.loop", max_repairs=parsed.max_repairs) as loop_span:
            # to_thread copies the context: generations and validations are children of code.loop.
            try:
                outcome, generations = await asyncio.to_thread(
                    run_code_loop, self.llm, self.code_validator, task, parsed.tests, sampling,
                    self.config.code_validator.codecheck, parsed.max_repairs, self.config.request_timeout_s,
                    asyncio.get_running_loop(),  # the worker thread calls the handles on this loop
                    cancelled, adapter,
                )
            except asyncio.CancelledError:  # the client went away: start no more rounds
                cancelled.set()
                raise
            loop_span.set_attributes({"attempts": len(outcome.attempts), "status": outcome.status})
        last = generations.generations[-1]
        reasoning, content = await self.screen.output_text(last.reasoning), await self.screen.output_text(last.content)
        report = outcome.to_dict()
        report["code"] = await self.screen.output_text(outcome.code)
        for attempt in report["errors"]:
            attempt["errors"] = [await self.screen.output_text(e) for e in attempt["errors"]]
        if turn is not None:
            await self.sessions.finish_turn(turn, content)
        usage = usage_dict(sum(g.prompt_tokens for g in generations.generations),
                           sum(g.completion_tokens for g in generations.generations),
                           total_cached([g.cached_tokens for g in generations.generations]))
        metrics.record_generation("chat", None, usage["prompt_tokens"], usage["completion_tokens"], parsed.model)
        choices = [chat_choice(0, reasoning, content, last.finish_reason)]
        extra: dict[str, Any] = {"code_validation": report}
        headers = {}
        if turn is not None:
            extra["session_id"] = turn.session_id
            headers[SESSION_HEADER] = turn.session_id
        return JSONResponse(chat_response(new_id("chatcmpl"), parsed.model, choices, usage, **extra),
                            headers=headers)

    async def _response_object(self, events: ResponseEvents, choices: list[_Choice]) -> dict[str, Any]:
        """A Responses request's whole (not streamed) response."""
        usage = _usage(choices)
        reasoning = "".join(choices[0].reasoning)
        return events.finished(reasoning, choices[0].answer(), self._finish_reason(choices[0]), usage["prompt_tokens"],
                               usage["completion_tokens"], await self._count_tokens(reasoning), choices[0].tool_calls,
                               choices[0].cached_tokens)

    @staticmethod
    def _finish_reason(choice: _Choice) -> str | None:
        """Why a Responses request's output ended: the engine's reason, or "content_filter" when the
        safety filter blocked it."""
        return "content_filter" if choice.screen.blocked else choice.finish_reason

    async def _chat_usage(self, choices: list[_Choice]) -> dict[str, Any]:
        """A chat request's usage, with its choices' reasoning tokens (`completion_tokens_details`,
        as OpenAI's and DeepSeek's APIs give them for reasoning models), counted again from the
        reasoning's (screened) text as the Responses API's usage counts them."""
        reasoning = sum([await self._count_tokens("".join(c.reasoning)) for c in choices])
        return {**_usage(choices), "completion_tokens_details": {"reasoning_tokens": reasoning}}

    async def _count_tokens(self, text: str) -> int:
        """Tokens of generated text, counted again (reasoning_tokens in usage): a short text on the
        event loop (cheaper than a thread hop), a long one off it (milliseconds to tokenize)."""
        if len(text) < SHORT_TEXT_CHARS:
            return len(self.tokenizer.encode(text, add_special_tokens=False)) if text else 0
        return len(await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=False))

    def _screening_context(self, chat: bool, echo: bool, prompt: Any, prefill: dict[str, Any] | None) -> str:
        """The end of the text a reply continues, as its output screening's context: a completion's
        prompt, the start of a continued assistant message; none for a new chat message (it comes
        after the template's role markers) or an echoed prompt (screened as output itself)."""
        if prefill is not None:
            return prefill["content"][-CONTINUED_CHARS:]
        return "" if chat or echo else self._continued_text(prompt)

    def _continued_text(self, prompt: str | list[int]) -> str:
        """The end of the text a completion continues."""
        if isinstance(prompt, str):
            return prompt[-CONTINUED_CHARS:]
        return self.tokenizer.decode(prompt[-CONTINUED_CHARS:], skip_special_tokens=False)

    def _check_token_ids(self, tokens: list[int], param: str) -> None:
        """Refuse ids the tokenizer does not have before anything decodes them (the screening of a
        token-id prompt does; an id past 2**32 overflows the tokenizer). Ids are >= 0 by the schema."""
        vocab = len(self.tokenizer)
        if any(token >= vocab for token in tokens):
            raise APIError(400, f"token ids must be below the vocabulary size {vocab}", param=param, code="invalid_value")

    async def _check_prompt_fits(self, prompt: Any, param: str) -> None:
        """Refuse a prompt longer than the model's context before it is screened: screening takes
        time in proportion to the text, and nothing could be generated from this one (the LLM
        server checks the exact prompt and max_tokens later). A token holds at least one byte of
        text, so a prompt of at most `context` bytes fits and is not tokenized here."""
        context = self.context_tokens
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            count = len(prompt)
        else:
            texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
            if sum(len(t) for t in texts) * 4 <= context or sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) <= context:
                return
            # Tokenized apart, then less one token per message for merges across their boundaries.
            counts = await asyncio.to_thread(lambda: [len(self.tokenizer.encode(t, add_special_tokens=False)) for t in texts])
            count = sum(counts) - (len(texts) - 1)
        if count > context:
            raise APIError(400, f"the {param} is at least {count} tokens, more than the model's context of {context} "
                           "tokens; shorten it", param=param, code="context_length_exceeded")

    def _abandon(self, turn: Any) -> None:
        """The request stores no exchange and its client was not given the session's id: remove the
        session if its open created it (`SessionClient.abandon` decides), in the background (this
        may run while the request is being cancelled). Not for streams: their first chunk has
        already handed the id out."""
        if turn is not None:
            self._keep(asyncio.ensure_future(self.sessions.abandon(turn)))

    def _keep(self, future: asyncio.Future) -> None:
        """Hold a background clean-up (or the open it waits on) until it is done, so it is not
        garbage-collected halfway."""
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    def _drop_opening(self, opening: asyncio.Future | None) -> None:
        """The request failed before its turn was planned: once its session open has ended, remove the
        session if that open created it (in the background), and consume the open's own error (the
        request already fails with the first one)."""
        if opening is None:
            return

        def opened(future: asyncio.Future) -> None:
            if future.cancelled() or future.exception() is not None:
                return
            self._keep(asyncio.ensure_future(self.sessions.abandon(future.result())))

        self._keep(opening)
        opening.add_done_callback(opened)

    async def _read_json(self, request: Request) -> Any:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", code="request_too_large")
        # Read up to the limit and stop: a chunked upload declares no length, and reading it whole
        # first would hold any amount of memory before the check.
        received = bytearray()
        async for chunk in request.stream():
            received += chunk
            if len(received) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        return decode_json(bytes(received))

    def _open(self, prompt: Any, chat: bool, sampling: Any, index: int, adapter: str | None = None) -> Any:
        if sampling.seed is not None and index:
            sampling = sampling.model_copy(update={"seed": choice_seed(sampling.seed, index)})
        body = {"prompt": prompt, "chat": chat, "sampling": sampling.model_dump(), "request_id": new_id("gen"),
                "trace": inject_context()}
        if adapter is not None:
            body["adapter"] = adapter
        return self.llm.options(stream=True).stream.remote(body)

    async def _first_items(self, streams: list[Any]) -> list[dict[str, Any]]:
        """Wait (bounded) for each stream's start item, which carries its first delta; map refusals,
        and a generation that failed at its first token, to HTTP errors."""
        try:
            firsts = await asyncio.wait_for(
                asyncio.gather(*(anext(s) for s in streams)), timeout=self.config.request_timeout_s
            )
        except BackPressureError:
            self._cancel(streams)
            raise APIError(503, "the server is at capacity; retry later", code="overloaded") from None
        except asyncio.TimeoutError:
            self._cancel(streams)
            raise APIError(503, f"no model replica answered within {self.config.request_timeout_s:.0f}s; retry later",
                           code="timeout") from None
        except Exception as error:  # a replica died before answering: the client may retry
            self._cancel(streams)
            logger.warning("LLM server call failed before the first token: %s", type(error).__name__)
            raise APIError(503, "the model server is unavailable; retry later", code="unavailable") from None
        for item in firsts:
            if item["type"] == "error":
                self._cancel(streams)
                raise APIError(item["status"], item["message"], param=item.get("param"), code=item.get("code"))
            if item.get("error"):
                self._cancel(streams)
                raise APIError(503, "the model server failed while generating; retry the request", code="unavailable")
        return firsts

    @staticmethod
    def _cancel(streams: list[Any]) -> None:
        for stream in streams:
            stream.cancel()

    async def _drain(self, streams: list[Any], starts: list[dict[str, Any]], choices: list[_Choice]) -> None:
        async def one(stream: Any, start: dict[str, Any], choice: _Choice) -> None:
            # Nobody sees a non-streamed reply before it is complete: screen it in one call at the end.
            texts = [self._count(start, choice)]
            async for item in stream:
                texts.append(self._count(item, choice))
            await choice.finish("".join(texts))

        try:
            await asyncio.gather(*(one(s, f, c) for s, f, c in zip(streams, starts, choices)))
        except APIError:
            self._cancel(streams)
            raise
        except Exception:
            self._cancel(streams)
            raise APIError(503, "the model server failed while generating; retry the request", code="unavailable") from None
        finally:
            self._cancel(streams)

    @staticmethod
    def _count(item: dict[str, Any], choice: _Choice) -> str:
        """Book one stream item on its choice (tokens, timing, finish reason, logprobs); its text, unscreened."""
        if item.get("error"):
            raise APIError(503, "the model server failed while generating; retry the request", code="unavailable")
        choice.count(item)
        return item["text"]

    async def _screen_item(self, item: dict[str, Any] | None, choice: _Choice, root: Any) -> tuple[str, str, list[Entry]]:
        """Screen one stream item on its choice (None: the stream ended). The last item's text goes
        with what the filter still holds, in one call."""
        if item is None:
            if choice.finish_reason is not None:  # its last item flushed the screen
                return "", "", []
            text = ""  # the stream ended without its last item
        else:
            text = self._count(item, choice)
            if item["finish_reason"] is None:
                return await choice.feed(text)
        with use_span(root):  # the filter's span joins the request's trace
            return await choice.finish(text)

    async def _stream_body(
        self, streams: list[Any], starts: list[dict[str, Any]], choices: list[_Choice], response_id: str, chat: bool,
        include_usage: bool, turn: Any, root: Any, route: str, model: str, events: ResponseEvents | None = None,
    ) -> AsyncIterator[bytes]:
        """The SSE body: chat or completion chunks and [DONE], or a Responses request's events."""
        # What the request is recorded with, set when the stream ends: 200 (HTTP already said so), or
        # an error's status sent inside the stream. Still None in `finally`: the client went away.
        status: int | None = None
        created = int(time.time())
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: Any) -> None:
            await queue.put((index, starts[index]))  # the start item carries the first delta
            try:
                async for item in stream:
                    await queue.put((index, item))
            except Exception as error:
                await queue.put((index, {"error": type(error).__name__}))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            # A session's id goes in each choice's first chunk and in the usage chunk, as the
            # non-streamed response carries it (and the X-Session-Id header for both).
            extra = {"session_id": turn.session_id} if turn is not None else {}
            if events is not None:
                yield events.opening()
            elif chat:
                for index in range(len(streams)):
                    yield sse({**chat_chunk(response_id, model, created, index, {"role": "assistant", "content": ""}),
                               **extra})
            open_streams = len(streams)
            held: tuple[int, Any] | None = None  # taken from the queue while merging, not yet handled
            while open_streams:
                (index, item), held = held or await queue.get(), None
                # Items that piled up while the last one was screened go to the filter as one
                # (one SafetyFilter call instead of one per token under load).
                while item is not None and not item.get("error") and item["finish_reason"] is None and not queue.empty():
                    other_index, other = queue.get_nowait()
                    if other_index != index or other is None or other.get("error"):
                        held = (other_index, other)
                        break
                    item = _merged(item, other)
                choice = choices[index]
                try:
                    reasoning, content, entries = await self._screen_item(item, choice, root)
                except APIError as error:
                    status = error.status
                    yield events.error(error) if events is not None else sse(error.body())
                    return
                calls, choice.unsent_calls = choice.unsent_calls, []
                if events is not None:
                    if reasoning or content:
                        yield events.delta(reasoning, content)
                    if calls:
                        yield events.function_calls(calls)
                elif reasoning or content or entries or calls:
                    yield self._chunk(chat, response_id, model, created, index, reasoning, content, None,
                                      self._logprobs(chat, choice, entries), calls, usage=choice.usage_so_far())
                if item is None:
                    open_streams -= 1
                    if events is None:
                        yield self._chunk(chat, response_id, model, created, index, "", "", choice.finish_reason or "abort",
                                          stop_reason=choice.stop_reason, usage=choice.usage_so_far())
            closing = None
            if events is not None:  # the response's last events, and its object (stored with the exchange)
                usage = _usage(choices)
                closing = events.closing(self._finish_reason(choices[0]), usage["prompt_tokens"],
                                         usage["completion_tokens"], await self._count_tokens(events.reasoning),
                                         choices[0].cached_tokens)
            if turn is not None:
                # Store the exchange before [DONE] (or response.completed): a client that saw it can rely on the history.
                try:
                    with use_span(root):
                        await self.sessions.finish_turn(turn, choices[0].stored_reply(), _stored_data(events))
                except APIError as error:
                    status = error.status
                    yield events.error(error) if events is not None else sse(error.body())
                    return
            if closing is not None:
                status = 200
                yield closing
                return
            if include_usage:
                usage = await self._chat_usage(choices) if chat else _usage(choices)
                chunk = chat_chunk(response_id, model, created, -1, {}, usage=usage) if chat else \
                    completion_chunk(response_id, model, created, -1, "", usage=usage)
                yield sse({**chunk, **extra})
            status = 200
            yield sse("[DONE]")
        finally:
            if status is None:  # the client disconnected (or the server is stopping): not a success
                status = CLIENT_CLOSED_REQUEST
                root.set_attribute("r1.cancelled", True)
            # Runs on normal end and when the client disconnects: stop generating for it.
            for task in tasks:
                task.cancel()
            self._cancel(streams)
            # The request's span and metrics end with the last byte (or when the client went away).
            self._record_generation(route, root, choices, model)
            end_span(root, **{"http.status_code": status})
            metrics.record_request(route, status, choices[0].timer.elapsed_s() if choices[0].timer else None)

    @staticmethod
    def _record_generation(route: str, root: Any, choices: list[_Choice], model: str) -> None:
        usage = _usage(choices)
        root.set_attributes({"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]})
        metrics.record_generation(route, choices[0].timer, usage["prompt_tokens"], usage["completion_tokens"], model)
        if choices[0].calls is not None:  # a request that offered tools: how many calls its answers made
            calls = sum(len(choice.tool_calls) for choice in choices)
            root.set_attribute("tool_calls", calls)
            metrics.record_tool_calls(route, choices[0].calls.plan.mode, calls)

    def _logprobs(self, chat: bool, choice: _Choice, entries: list[Entry]) -> dict[str, Any] | None:
        """A choice's (or chunk's) `logprobs` body of released `entries`; None if it did not ask."""
        if choice.ledger is None:
            return None
        name_of = token_id_name if choice.tokens_as_ids else None
        if chat:
            return chat_logprobs(entries, self.token_texts, name_of)
        body, choice.text_offset = completion_logprobs(entries, self.token_texts, choice.text_offset, name_of)
        return body

    @staticmethod
    def _chunk(chat: bool, response_id: str, model: str, created: int, index: int, reasoning: str, content: str,
               finish_reason: str | None, logprobs: dict[str, Any] | None = None,
               tool_calls: list[dict[str, Any]] | None = None, stop_reason: str | int | None = None,
               usage: dict[str, int] | None = None) -> bytes:
        if chat:
            delta: dict[str, Any] = {}
            if reasoning:
                delta["reasoning_content"] = reasoning
                delta["reasoning"] = reasoning
            if content:
                delta["content"] = content
            if tool_calls:  # each whole, in one delta (OpenAI's clients join argument pieces; one is a valid piece)
                delta["tool_calls"] = [{"index": number, **call} for number, call in enumerate(tool_calls)]
            return sse(chat_chunk(response_id, model, created, index, delta, finish_reason, usage, logprobs,
                                  stop_reason))
        return sse(completion_chunk(response_id, model, created, index, content, finish_reason, usage, logprobs,
                                    stop_reason))

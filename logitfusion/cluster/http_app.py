"""The HTTP ingress: an OpenAI-compatible API, vLLM-style tokenizer endpoints and Prometheus /metrics.

It runs inside the same Serve replica as the gRPC ingress (cluster.serve_app builds it with
``__serve_build_asgi_app__``) and drives the same Coordinator with the same limits and bearer token:

    POST /v1/completions        prompt: string | [string] | [token ids] | [[token ids]]; one choice per prompt
    POST /v1/chat/completions   models whose tokenizer has a chat template (else 400)
    GET  /v1/models             the presets ("model" names a preset)
    GET  /health                200 while the pipeline serves, else 503
    POST /tokenize  POST /detokenize  GET /tokenizer_info     (lm-evaluation-harness's remote tokenizer)
    GET  /metrics               Prometheus text format (logitfusion.metrics)

Every failure answers in OpenAI's error JSON, ``{"error": {"message", "type", "param", "code"}}``, with the status
of errors.to_http (400 / 401 / 413 / 429 / 503 ...) and the same message a gRPC client would get; ``param`` names
the field. Extensions live under "logitfusion": per request (recipe overrides, speculative options, stop_at_eos)
and per choice in the answer (the expert weights of every generated token; with echo + logprobs, those solved at
every prompt position).

``logprobs`` are the FUSED distribution's (never one model's), before temperature: a generation is decoded, then
the prompt and completion are scored in one all-positions pass of every model (Coordinator.score), fused and
solved per position. That is why ``logprobs`` (and echo's prompt log-probs) are refused with ``stream``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from logitfusion.cluster.convert import MAX_TEMPERATURE, check_prompt_length, request_from_pb
from logitfusion.errors import (
    DeadlineExceeded,
    FusionError,
    InvalidRequest,
    MessageTooLarge,
    Unauthenticated,
    to_http,
)
from logitfusion.fusion.methods import FIELDS as RECIPE_FIELDS
from logitfusion.metrics import CONTENT_TYPE
from logitfusion.v1 import fusion_pb2 as pb

if TYPE_CHECKING:
    from logitfusion.actors.coordinator import Coordinator, StreamChunk
    from logitfusion.cluster.topology import Topology
    from logitfusion.engine.decoder import GenerationRequest
    from logitfusion.engine.scoring import SequenceScores
    from logitfusion.metrics import ServiceMetrics


MAX_LOGPROBS = 20  # most top log-probs per position
NEG_INF_LOGPROB = -9999.0  # JSON has no -inf: a token the fused distribution excludes reports this
MAX_SEED = (1 << 63) - 1
_FINISH = {"length": "length", "eos": "stop", "stop": "stop"}
_COMPLETION_FIELDS = frozenset({
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
    "logprobs", "echo", "n", "best_of", "user", "presence_penalty", "frequency_penalty", "logit_bias", "suffix",
    "logitfusion",
})
_CHAT_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "stream", "stream_options", "n", "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_logprobs", "logitfusion",
})
_EXTENSION_FIELDS = frozenset({"recipe", "speculative", "stop_at_eos"})
_RECIPE_FIELDS = ("method", *RECIPE_FIELDS)  # logitfusion.recipe: the gRPC RecipeSelection's fields, preset aside


# ------------------------------------------------------------------------------------------------ field checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if _is_number(v) else type(v).__name__
    )


def _want(body: dict, name: str, kind: str, default: Any = None, *, where: str | None = None) -> Any:
    """body[name] checked to be of ``kind`` ("int", "number", "bool", "string", "object", "array"); null -> default."""
    value = body.get(name)
    if value is None:
        return default
    ok = {"int": _is_int, "number": _is_number, "bool": lambda v: isinstance(v, bool),
          "string": lambda v: isinstance(v, str), "object": lambda v: isinstance(v, dict),
          "array": lambda v: isinstance(v, list)}[kind](value)
    if not ok:
        label = {"int": "an integer", "number": "a number", "bool": "a boolean", "string": "a string",
                 "object": "an object", "array": "an array"}[kind]
        at = where or name
        raise InvalidRequest(f"{at}: expected {label}, got {_type_name(value)}", field=at)
    return value


def _check_unknown(body: dict, known: frozenset[str], where: str = "") -> None:
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        name = f"{where}{unknown[0]}"
        raise InvalidRequest(f"{name}: unknown field (known: {', '.join(sorted(known))})", field=name)


def _unsupported_zero(body: dict, names: Sequence[str]) -> None:
    for name in names:
        v = body.get(name)
        if v is None or v == 0 or v == {}:
            continue
        raise InvalidRequest(f"{name}: not supported by this service (only 0 / empty / null)", field=name)


@dataclass
class Sampling:
    """The sampling fields of a completion or chat request, checked against the deployment's limits."""

    preset: str
    max_tokens: int
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    extension: dict[str, Any] = field(default_factory=dict)


def parse_sampling(body: dict, topology: Topology, *, max_tokens_field: str = "max_tokens",
                   allow_zero_tokens: bool = False) -> Sampling:
    """The fields completions and chat share. Raises InvalidRequest naming the field and the limit."""
    limits = topology.limits
    preset = _want(body, "model", "string", topology.default_preset)
    if preset not in topology.presets:
        raise InvalidRequest(
            f"model: unknown model {preset!r}; this deployment serves the presets {sorted(topology.presets)}",
            field="model",
        )
    n = _want(body, "n", "int", 1)
    if n != 1:
        raise InvalidRequest(f"n: only n = 1 is supported, got {n} (send the prompt again for more samples)",
                             field="n")
    if "best_of" in body and _want(body, "best_of", "int", 1) != 1:
        raise InvalidRequest(f"best_of: only best_of = 1 is supported, got {body['best_of']}", field="best_of")
    _unsupported_zero(body, ("presence_penalty", "frequency_penalty", "logit_bias"))
    max_tokens = _want(body, max_tokens_field, "int", limits.default_max_new_tokens)
    lo = 0 if allow_zero_tokens else 1
    if not lo <= max_tokens <= limits.max_new_tokens:
        extra = " (0 only with echo)" if not allow_zero_tokens and max_tokens == 0 else ""
        raise InvalidRequest(
            f"{max_tokens_field}: {max_tokens} must be in [{lo}, {limits.max_new_tokens}] (the limit max_new_tokens)"
            f"{extra}",
            field=max_tokens_field,
        )
    temperature = _want(body, "temperature", "number")
    if temperature is not None and not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
        raise InvalidRequest(f"temperature: {temperature} must be finite and in [0.0, {MAX_TEMPERATURE}]",
                             field="temperature")
    top_p = _want(body, "top_p", "number")
    if top_p is not None and not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise InvalidRequest(f"top_p: {top_p} must be finite and in (0.0, 1.0]", field="top_p")
    top_k = _want(body, "top_k", "int")
    if top_k is not None and top_k < 0:
        raise InvalidRequest(f"top_k: {top_k} must be >= 0 (0: off)", field="top_k")
    seed = _want(body, "seed", "int")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"seed: {seed} must be in [0, 2^63 - 1]", field="seed")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise InvalidRequest(f"stop: expected a string or an array of strings, got {_type_name(stop)}", field="stop")
    stream = _want(body, "stream", "bool", False)
    options = _want(body, "stream_options", "object", {})
    _check_unknown(options, frozenset({"include_usage"}), "stream_options.")
    include_usage = _want(options, "include_usage", "bool", False, where="stream_options.include_usage")
    ext = _want(body, "logitfusion", "object", {})
    _check_unknown(ext, _EXTENSION_FIELDS, "logitfusion.")
    return Sampling(preset, max_tokens, temperature, top_p, top_k, seed, stops, stream, include_usage, ext)


def build_pb(sampling: Sampling, ids: Sequence[int], request_id: str) -> Any:
    """The checked fields as a GenerateRequest, so serve_app.request_from_pb applies the very checks gRPC gets."""
    msg = pb.GenerateRequest(request_id=request_id)
    msg.token_ids.ids.extend(ids)
    msg.max_new_tokens = max(1, sampling.max_tokens)  # max_tokens 0 (echo): checked, never submitted
    for name in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(sampling, name)
        if value is not None:
            setattr(msg.sampling, name, value)
    msg.stop.extend(sampling.stop)
    msg.recipe.preset = sampling.preset
    ext = sampling.extension
    recipe = _want(ext, "recipe", "object", {}, where="logitfusion.recipe")
    _check_unknown(recipe, frozenset(_RECIPE_FIELDS), "logitfusion.recipe.")
    for name in _RECIPE_FIELDS:
        if recipe.get(name) is None:
            continue
        where = f"logitfusion.recipe.{name}"
        try:
            if name in ("experts", "alphas"):
                getattr(msg.recipe, name).extend(_want(recipe, name, "array", where=where))
            else:
                setattr(msg.recipe, name, recipe[name])
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"{where}: {exc}", field=where) from None
    spec = _want(ext, "speculative", "object", {}, where="logitfusion.speculative")
    _check_unknown(spec, frozenset({"draft_model", "num_draft_tokens", "adaptive"}), "logitfusion.speculative.")
    if spec:
        msg.speculative.draft_model = _want(spec, "draft_model", "string", "",
                                            where="logitfusion.speculative.draft_model")
        k = _want(spec, "num_draft_tokens", "int", where="logitfusion.speculative.num_draft_tokens")
        if k is not None:
            msg.speculative.num_draft_tokens = k
        msg.speculative.adaptive = _want(spec, "adaptive", "bool", False, where="logitfusion.speculative.adaptive")
    eos = _want(ext, "stop_at_eos", "bool", None, where="logitfusion.stop_at_eos")
    if eos is not None:
        msg.stop_at_eos = eos
    return msg


_PB_TO_HTTP = {  # gRPC field names in request_from_pb's messages -> the HTTP request's
    "max_new_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "token_ids.ids": "prompt",
    "recipe.preset": "model",
}


def _http_field(exc: FusionError) -> FusionError:
    """request_from_pb names gRPC fields; name the HTTP ones (recipe.* -> logitfusion.recipe.*)."""
    name = exc.field
    if not name:
        return exc
    new = _PB_TO_HTTP.get(name)
    if new is None and (name.startswith("recipe") or name.startswith("speculative")):
        new = f"logitfusion.{name}"
    if new is None or not exc.message.startswith(name):
        return exc
    return type(exc)(new + exc.message[len(name):], field=new)


# ------------------------------------------------------------------------------------------------ the frontend


@dataclass
class ChoiceResult:
    index: int
    prompt_ids: tuple[int, ...]
    prompt_text: str
    chunks: list[StreamChunk]
    scores: SequenceScores | None = None

    @property
    def completion_ids(self) -> list[int]:
        return [t.token_id for c in self.chunks for t in c.tokens]

    @property
    def text(self) -> str:
        return self.chunks[-1].finished.text if self.chunks and self.chunks[-1].finished else ""

    @property
    def finish_reason(self) -> str:
        f = self.chunks[-1].finished if self.chunks else None
        return _FINISH[f.reason] if f is not None else "length"


class HttpFrontend:
    """The HTTP API over one Coordinator, with the gRPC frontend's topology, limits and token (``grpc_frontend``)."""

    def __init__(self, topology: Topology, coordinator: Coordinator, grpc_frontend: Any, tokenizer: Any,
                 metrics: ServiceMetrics | None = None) -> None:
        self.topology = topology
        self.coordinator = coordinator
        self.grpc_frontend = grpc_frontend
        self.tokenizer = tokenizer
        self.metrics = metrics
        infos = coordinator.models()
        self.vocab_size = next(iter(infos.values())).vocab_size
        self.max_model_len = min(i.max_length_tokens for i in infos.values())
        self.created = int(time.time())

    # ------------------------------------------------------------------------------------ plumbing

    def authenticate(self, request: Request) -> None:
        try:
            self.grpc_frontend.authenticate(list(request.headers.items()))
        except Unauthenticated:
            raise Unauthenticated("header Authorization: missing or wrong bearer token (expected 'Bearer <token>')",
                                  field="Authorization") from None

    async def read_json(self, request: Request) -> dict:
        """The request body as a JSON object, refusing bodies over limits.max_message_bytes by name."""
        limit = self.topology.limits.max_message_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise MessageTooLarge(f"request: {declared} bytes exceed the limit max_message_bytes ({limit})",
                                  field="request")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise MessageTooLarge(f"request: more than {limit} bytes, over the limit max_message_bytes ({limit})",
                                      field="request")
        try:
            data = json.loads(bytes(body))
        except (ValueError, RecursionError) as exc:
            raise InvalidRequest(f"body: not valid JSON ({exc})", field="body") from None
        if not isinstance(data, dict):
            raise InvalidRequest(f"body: expected a JSON object, got {_type_name(data)}", field="body")
        return data

    def error(self, exc: BaseException, preset: str | None = None, api: str = "http") -> Response:
        status, kind, err = to_http(exc)
        if self.metrics is not None and api:
            self.metrics.request_done(preset, err.code.name.lower(), api)
        retry = getattr(err, "retry_after_s", None)  # ShuttingDown: the drain's retry hint as Retry-After
        return JSONResponse({"error": {"message": err.message, "type": kind, "param": err.field, "code": status}},
                            status_code=status, headers={"Retry-After": str(math.ceil(retry))} if retry else None)

    def _done(self, preset: str | None, api: str) -> None:
        if self.metrics is not None:
            self.metrics.request_done(preset, "ok", api)

    def _request(self, sampling: Sampling, ids: Sequence[int], rid: str) -> GenerationRequest:
        self.grpc_frontend.check_admitting()  # draining for shutdown: 503 with Retry-After
        msg = build_pb(sampling, ids, rid)
        try:
            return request_from_pb(msg, topology=self.topology, codec=self.coordinator.codec,
                                   vocab_size=self.vocab_size, request_id=rid)
        except FusionError as exc:
            raise _http_field(exc) from None

    def _requests(self, sampling: Sampling, prompts: Sequence[Sequence[int]], cid: str) -> list[GenerationRequest]:
        """One engine request per prompt (choice). The body's fields are converted and checked once, with the first
        prompt; the others differ only in their prompt, whose ids parse_prompts checked, so only its length is."""
        first = self._request(sampling, prompts[0], f"{cid}-0")
        out = [first]
        for i, ids in enumerate(prompts[1:], 1):
            try:
                check_prompt_length(ids, "token_ids.ids", self.topology.limits)
            except FusionError as exc:
                raise _http_field(exc) from None
            out.append(replace(first, request_id=f"{cid}-{i}", prompt_ids=tuple(ids)))
        return out

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ------------------------------------------------------------------------------------ prompts

    def parse_prompts(self, prompt: Any) -> list[tuple[tuple[int, ...], str | None]]:
        """prompt -> [(token ids, text or None)], one per choice."""
        limits = self.topology.limits
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            items = [prompt]
        elif isinstance(prompt, list) and prompt:
            items = prompt
        else:
            raise InvalidRequest(
                f"prompt: expected a string, an array of strings, an array of token ids or an array of such arrays, "
                f"got {'an empty array' if prompt == [] else _type_name(prompt)}",
                field="prompt",
            )
        if len(items) > limits.max_concurrent_requests:
            raise InvalidRequest(f"prompt: {len(items)} prompts, over the limit max_concurrent_requests "
                                 f"({limits.max_concurrent_requests})", field="prompt")
        out = []
        for i, item in enumerate(items):
            where = f"prompt[{i}]" if len(items) > 1 or not isinstance(prompt, str) else "prompt"
            if isinstance(item, str):
                if not item:
                    raise InvalidRequest(f"{where}: the prompt must not be empty", field=where)
                out.append((tuple(self.coordinator.codec.encode(item)), item))
            elif isinstance(item, list) and item and all(_is_int(t) for t in item):
                for j, t in enumerate(item):
                    if not 0 <= t < self.vocab_size:
                        raise InvalidRequest(f"{where}[{j}]: token id {t} is outside [0, vocab_size={self.vocab_size})",
                                             field=where)
                out.append((tuple(item), None))
            else:
                raise InvalidRequest(f"{where}: expected a non-empty string or a non-empty array of token ids, got "
                                     f"{_type_name(item)}", field=where)
        return out

    # ------------------------------------------------------------------------------------ running a choice

    async def _generate(self, req: GenerationRequest) -> list[StreamChunk]:
        stream = self.coordinator.submit(req)
        chunks = []
        try:
            async for chunk in stream:
                chunks.append(chunk)
        finally:
            if not stream.ended:
                self.coordinator.abort(stream.request_id)
        return chunks

    async def _score(self, ids: Sequence[int], req: GenerationRequest, top_n: int) -> SequenceScores:
        fut = self.coordinator.score(ids, req.recipe, top_n=top_n)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout=self.topology.limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"scoring ran longer than limits.request_timeout_s "
                                   f"({self.topology.limits.request_timeout_s:g} s)") from None

    async def _choice(self, index: int, ids: tuple[int, ...], text: str | None, req: GenerationRequest,
                      generate: bool, top_n: int | None) -> ChoiceResult:
        chunks = await self._generate(req) if generate else []
        res = ChoiceResult(index, ids, text if text is not None else self.coordinator.codec.decode(ids), chunks)
        if top_n is not None:
            res.scores = await self._score(tuple(ids) + tuple(res.completion_ids), req, max(1, top_n))
        return res

    async def _run_all(self, jobs: list) -> list[ChoiceResult]:
        tasks = [asyncio.ensure_future(j) for j in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()  # their finally blocks abort what they started
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    # ------------------------------------------------------------------------------------ logprobs

    def _logprobs_json(self, res: ChoiceResult, top_n: int, echo: bool) -> dict:
        scores = res.scores
        assert scores is not None
        n_prompt = len(res.prompt_ids)
        ids = list(scores.token_ids)
        first = 0 if echo else n_prompt
        tokens, lps, tops, offsets = [], [], [], []
        offset = 0
        for pos in range(first, len(ids)):
            tok = self.token_text(ids[pos])
            tokens.append(tok)
            offsets.append(offset)
            offset += len(tok)
            if pos == 0:
                lps.append(None)
                tops.append(None)
                continue
            lps.append(_finite(scores.token_logprobs[pos - 1]))
            top: dict[str, float] = {}
            for tid, lp in scores.top[pos - 1][:top_n]:
                top.setdefault(self.token_text(tid), _finite(lp))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _echo_text(self, res: ChoiceResult) -> str:
        """The prompt followed by the completion as the tokenizer joins them (a word-level tokenizer puts the space
        between them that neither text has on its own)."""
        if not res.text:
            return res.prompt_text
        decode = self.coordinator.codec.decode
        head, whole = decode(res.prompt_ids), decode(tuple(res.prompt_ids) + tuple(res.completion_ids))
        if whole.startswith(head):
            joined = whole[len(head):]
            if joined.endswith(res.text) and not joined[: len(joined) - len(res.text)].strip():
                return res.prompt_text + joined[: len(joined) - len(res.text)] + res.text
        return res.prompt_text + res.text

    def _extension(self, res: ChoiceResult, req: GenerationRequest, with_prompt: bool) -> dict:
        out: dict[str, Any] = {
            "experts": list(req.recipe.experts),
            "weights": [[w for _, w in c.weights] for c in res.chunks],  # one row per generated token
            "steps": [c.step for c in res.chunks],
        }
        last = res.chunks[-1].finished if res.chunks else None
        if last is not None:
            out.update(drafted_tokens=last.drafted_tokens, accepted_tokens=last.accepted_tokens)
        if with_prompt and res.scores is not None:
            out["prompt_weights"] = [list(a) for a in res.scores.alphas[: len(res.prompt_ids)]]
        return out

    # ------------------------------------------------------------------------------------ endpoints

    async def completions(self, request: Request) -> Response:
        preset = None
        try:
            self.authenticate(request)
            body = await self.read_json(request)
            _check_unknown(body, _COMPLETION_FIELDS)
            if body.get("suffix") is not None:
                raise InvalidRequest("suffix: not supported by this service", field="suffix")
            echo = _want(body, "echo", "bool", False)
            logprobs = _want(body, "logprobs", "int")
            if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
                raise InvalidRequest(f"logprobs: {logprobs} must be in [0, {MAX_LOGPROBS}]", field="logprobs")
            sampling = parse_sampling(body, self.topology, allow_zero_tokens=echo)
            preset = sampling.preset
            if "prompt" not in body:
                raise InvalidRequest("prompt: required", field="prompt")
            prompts = self.parse_prompts(body["prompt"])
            if sampling.stream and logprobs is not None:
                raise InvalidRequest("logprobs: not supported with stream=true (the fused log-probs are scored "
                                     "after decoding); send stream=false", field="logprobs")
            if sampling.stream and len(prompts) > 1:
                raise InvalidRequest(f"prompt: stream=true takes one prompt, got {len(prompts)}", field="prompt")
            cid = f"cmpl-{uuid.uuid4().hex}"
            reqs = self._requests(sampling, [ids for ids, _ in prompts], cid)
            if sampling.stream:
                (ids, text), req = prompts[0], reqs[0]
                echo_text = (text if text is not None else self.coordinator.codec.decode(ids)) if echo else None
                return self._stream(cid, "text_completion", req, sampling, echo_text=echo_text, chat=False)
            results = await self._run_all([
                self._choice(i, ids, text, reqs[i], sampling.max_tokens > 0, logprobs)
                for i, (ids, text) in enumerate(prompts)
            ])
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure answers in OpenAI's error JSON
            return self.error(exc, preset)
        choices = []
        for res, req in zip(results, reqs):
            choices.append({
                "index": res.index,
                "text": self._echo_text(res) if echo else res.text,
                "logprobs": self._logprobs_json(res, logprobs, echo) if logprobs is not None else None,
                "finish_reason": res.finish_reason if sampling.max_tokens > 0 else "length",
                "logitfusion": self._extension(res, req, echo),
            })
        self._done(preset, "http")
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": int(time.time()), "model": preset,
            "choices": choices, "usage": _usage(results),
            "logitfusion": {"recipe": reqs[0].recipe.name},
        })

    async def chat_completions(self, request: Request) -> Response:
        preset = None
        try:
            self.authenticate(request)
            body = await self.read_json(request)
            _check_unknown(body, _CHAT_FIELDS)
            if _want(body, "logprobs", "bool", False) or body.get("top_logprobs") is not None:
                raise InvalidRequest("logprobs: not supported on /v1/chat/completions; use /v1/completions with "
                                     "logprobs", field="logprobs")
            field_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            sampling = parse_sampling(body, self.topology, max_tokens_field=field_name)
            preset = sampling.preset
            ids = self.chat_prompt(body.get("messages"))
            cid = f"chatcmpl-{uuid.uuid4().hex}"
            req = self._request(sampling, ids, f"{cid}-0")
            if sampling.stream:
                return self._stream(cid, "chat.completion.chunk", req, sampling, echo_text=None, chat=True)
            res = (await self._run_all([self._choice(0, ids, None, req, True, None)]))[0]
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001
            return self.error(exc, preset)
        self._done(preset, "http")
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": int(time.time()), "model": preset,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": res.text}, "logprobs": None,
                "finish_reason": res.finish_reason, "logitfusion": self._extension(res, req, False),
            }],
            "usage": _usage([res]),
            "logitfusion": {"recipe": req.recipe.name},
        })

    def chat_prompt(self, messages: Any) -> tuple[int, ...]:
        """messages -> prompt ids through the tokenizer's chat template (400 naming the field without one)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("model: this deployment's tokenizer has no chat template; use /v1/completions with "
                                 "a plain prompt", field="model")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest(f"messages: expected a non-empty array, got {_type_name(messages)}",
                                 field="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise InvalidRequest(f"messages[{i}]: expected an object, got {_type_name(m)}", field=f"messages[{i}]")
            role = _want(m, "role", "string", where=f"messages[{i}].role")
            content = _want(m, "content", "string", where=f"messages[{i}].content")
            if role not in ("system", "user", "assistant") or content is None:
                raise InvalidRequest(f"messages[{i}]: needs role (system, user or assistant) and string content",
                                     field=f"messages[{i}]")
            clean.append({"role": role, "content": content})
        try:
            text = self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template may raise on an order it refuses (jinja errors)
            raise InvalidRequest(f"messages: the chat template refused them: {exc}", field="messages") from None
        ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
        limit = self.topology.limits.max_prompt_tokens
        if len(ids) > limit:
            raise InvalidRequest(f"messages: the templated prompt has {len(ids)} tokens, over the limit "
                                 f"max_prompt_tokens ({limit})", field="messages")
        return ids

    def _stream(self, cid: str, obj: str, req: GenerationRequest, sampling: Sampling, *, echo_text: str | None,
                chat: bool) -> Response:
        """Admit now (overload and bad input are a status), then stream server-sent events ending with [DONE]."""
        stream = self.coordinator.submit(req) if sampling.max_tokens > 0 else None  # 0: echo only
        created = int(time.time())
        preset = sampling.preset

        def event(choice: dict, extra: dict | None = None) -> str:
            msg = {"id": cid, "object": obj, "created": created, "model": preset, "choices": [choice]}
            if extra:
                msg.update(extra)
            return f"data: {json.dumps(msg)}\n\n"

        async def events() -> AsyncIterator[str]:
            status = "ok"
            last = None
            try:
                if chat:
                    yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
                elif echo_text is not None:
                    done = "length" if stream is None else None
                    yield event({"index": 0, "text": echo_text, "logprobs": None, "finish_reason": done})
                async for chunk in stream if stream is not None else _nothing():
                    last = chunk.finished or last
                    text = "".join(t.text for t in chunk.tokens)
                    fin = _FINISH[chunk.finished.reason] if chunk.finished else None
                    ext = {"logitfusion": {"step": chunk.step, "experts": list(req.recipe.experts),
                                           "weights": [w for _, w in chunk.weights]}}
                    if chat:
                        yield event({"index": 0, "delta": {"content": text}, "finish_reason": fin}, ext)
                    else:
                        yield event({"index": 0, "text": text, "logprobs": None, "finish_reason": fin}, ext)
                if sampling.include_usage and last is not None:
                    usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                             "total_tokens": last.prompt_tokens + last.completion_tokens}
                    msg = {"id": cid, "object": obj, "created": created, "model": preset, "choices": [],
                           "usage": usage}
                    yield f"data: {json.dumps(msg)}\n\n"
            except asyncio.CancelledError:
                status = "cancelled"
                raise
            except BaseException as exc:  # noqa: BLE001 - mid-stream failure: an error event, then [DONE]
                code, kind, err = to_http(exc)
                status = err.code.name.lower()
                error = {"message": err.message, "type": kind, "param": err.field, "code": code}
                yield f"data: {json.dumps({'error': error})}\n\n"
            finally:
                if stream is not None and not stream.ended:
                    self.coordinator.abort(stream.request_id)
                if self.metrics is not None:
                    self.metrics.request_done(preset, status, "http")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def models(self, request: Request) -> Response:
        try:
            self.authenticate(request)
        except BaseException as exc:  # noqa: BLE001
            return self.error(exc, api="")
        data = [{
            "id": name, "object": "model", "created": self.created, "owned_by": "logitfusion",
            "max_model_len": self.max_model_len,
            "logitfusion": {"method": spec.method, "experts": list(spec.experts), "description": spec.description,
                            "default": name == self.topology.default_preset},
        } for name, spec in sorted(self.topology.presets.items())]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        ok = self.grpc_frontend.serving and not self.grpc_frontend.draining and self.coordinator.alive()
        return JSONResponse({"status": "ok" if ok else "not serving"}, status_code=200 if ok else 503)

    async def tokenize(self, request: Request) -> Response:
        try:
            self.authenticate(request)
            body = await self.read_json(request)
            _check_unknown(body, frozenset({"model", "prompt", "messages", "add_special_tokens",
                                            "add_generation_prompt", "return_token_strs"}))
            special = _want(body, "add_special_tokens", "bool", True)
            if body.get("messages") is not None:
                ids = list(self.chat_prompt(body["messages"]))
            else:
                prompt = _want(body, "prompt", "string")
                if prompt is None:
                    raise InvalidRequest("prompt: required (a string), or messages", field="prompt")
                ids = list(self.tokenizer.encode(prompt, add_special_tokens=special))
            strs = [self.token_text(t) for t in ids] if _want(body, "return_token_strs", "bool", False) else None
        except BaseException as exc:  # noqa: BLE001
            return self.error(exc, api="")
        return JSONResponse({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
                             "token_strs": strs})

    async def detokenize(self, request: Request) -> Response:
        try:
            self.authenticate(request)
            body = await self.read_json(request)
            _check_unknown(body, frozenset({"model", "tokens"}))
            tokens = _want(body, "tokens", "array")
            if tokens is None or not all(_is_int(t) for t in tokens):
                raise InvalidRequest("tokens: expected an array of token ids", field="tokens")
            bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"tokens: token id {bad} is outside [0, vocab_size={self.vocab_size})",
                                     field="tokens")
            text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        except BaseException as exc:  # noqa: BLE001
            return self.error(exc, api="")
        return JSONResponse({"prompt": text})

    async def tokenizer_info(self, request: Request) -> Response:
        try:
            self.authenticate(request)
        except BaseException as exc:  # noqa: BLE001
            return self.error(exc, api="")
        tok = self.tokenizer
        return JSONResponse({
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
            "unk_token": tok.unk_token, "chat_template": getattr(tok, "chat_template", None) or None,
            "model_max_length": self.max_model_len, "vocab_size": self.vocab_size,
            "add_bos_token": bool(self.coordinator.codec.encode("a")[:1] == [tok.bos_token_id])
            if tok.bos_token_id is not None else False,
        })

    async def prometheus(self, request: Request) -> Response:
        try:
            self.authenticate(request)
        except BaseException as exc:  # noqa: BLE001
            return self.error(exc, api="")
        body = self.metrics.render() if self.metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE)


async def _nothing() -> AsyncIterator[Any]:
    return
    yield  # an empty async iterator


def _finite(lp: float) -> float:
    return lp if math.isfinite(lp) else NEG_INF_LOGPROB


def _usage(results: Sequence[ChoiceResult]) -> dict:
    prompt = sum(len(r.prompt_ids) for r in results)
    completion = sum(len(r.completion_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def build_http_app(http: HttpFrontend) -> Starlette:
    """The Starlette application of the HTTP ingress (the replica serves it through Serve's HTTP proxy)."""
    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: {exc.detail}",
                                       "type": kind, "param": None, "code": exc.status_code}},
                            status_code=exc.status_code)

    async def internal(request: Request, exc: Exception) -> Response:
        return http.error(exc, api="")

    routes = [
        Route("/v1/completions", http.completions, methods=["POST"]),
        Route("/v1/chat/completions", http.chat_completions, methods=["POST"]),
        Route("/v1/models", http.models, methods=["GET"]),
        Route("/health", http.health, methods=["GET"]),
        Route("/tokenize", http.tokenize, methods=["POST"]),
        Route("/detokenize", http.detokenize, methods=["POST"]),
        Route("/tokenizer_info", http.tokenizer_info, methods=["GET"]),
        Route("/metrics", http.prometheus, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal})


__all__ = ["HttpFrontend", "build_http_app", "parse_sampling", "build_pb"]

"""A Python client of FusionService (fusion.proto), and the `logitfusion generate` command.

    with FusionClient("127.0.0.1:9000") as client:
        print(client.generate("Q: what is the capital of Velar?", preset="dlf_capital").text)
        for tok in client.generate_stream("Q: ...", max_new_tokens=8):
            print(tok.text, tok.weights)

Errors come back as the service's own exception classes (logitfusion.errors): InvalidRequest, Overloaded,
DeadlineExceeded, ModelUnavailable, ... built from the gRPC status in one place (errors.from_rpc_error).
Protobuf types stay inside this module: callers see plain dataclasses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from logitfusion.errors import FusionError, from_rpc_error
from logitfusion.v1 import fusion_pb2 as pb
from logitfusion.v1 import fusion_pb2_grpc


DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the client's own receive/send bound; the server enforces its own
SERVICE_NAME = "logitfusion.v1.FusionService"

_FINISH = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP: "stop",
}


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, as streamed."""

    request_id: str
    token_id: int
    text: str  # text this token adds to the completion
    index: int  # position in the completion, from 0
    step: int  # decoding step of the request that produced it (shared by the tokens of one speculative draft)
    weights: dict[str, float]  # expert -> weight that produced this token (empty for recipes without experts)
    loss: float | None  # DLF objective at that position (None for static recipes)


@dataclass(frozen=True)
class Completion:
    """A finished generation."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "length" | "eos" | "stop"
    prompt_tokens: int
    completion_tokens: int
    steps: int  # decoding steps (fewer than completion_tokens when speculative drafts were accepted)
    weights: list[dict[str, float]] = field(default_factory=list)  # per token: expert -> weight
    recipe: str = ""
    stop: str = ""  # the stop string that ended it, if any
    drafted_tokens: int = 0  # speculative decoding: tokens proposed by the draft model
    accepted_tokens: int = 0  # of those, accepted by the fused distribution
    losses: list[float | None] = field(default_factory=list)  # per token: the DLF objective (None: static recipe)

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / drafted tokens; None without speculative decoding."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None


@dataclass(frozen=True)
class RecipeInfo:
    """A recipe preset the deployment serves."""

    name: str
    method: str
    models: list[str]
    experts: list[str]
    solver: str
    alphas: list[float]
    description: str
    is_default: bool


# ------------------------------------------------------------------------------------------------ to_pb / from_pb


def build_request(
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    preset: str = "",
    method: str | None = None,
    solver: str | None = None,
    experts: Sequence[str] = (),
    alphas: Sequence[float] = (),
    beta: float | None = None,
    interp_lambda: float | None = None,
    max_alpha: float | None = None,
    model: str | None = None,
    route_inner: str | None = None,
    route_tau: float | None = None,
    route_top_k: int | None = None,
    route_min_similarity: float | None = None,
    stop: Sequence[str] = (),
    stop_at_eos: bool | None = None,
    request_id: str = "",
    draft_model: str | None = None,
    num_draft_tokens: int | None = None,
    adaptive_draft: bool = False,
) -> pb.GenerateRequest:
    """Keyword arguments -> GenerateRequest. Unset (None) fields stay unset so the server's defaults apply.

    draft_model turns on speculative fused decoding (same output, fewer decoding steps when the draft agrees).
    route_*: a routed recipe's inner method, temperature, experts kept and "none" threshold (RecipeSelection
    inner / tau / top_k / min_similarity; ``top_k`` alone is the sampling's).
    """
    req = pb.GenerateRequest(request_id=request_id, stop=list(stop))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)
        if not req.HasField("token_ids"):
            req.token_ids.SetInParent()  # an empty id list is still "token ids" (the server refuses it by name)
    if max_new_tokens is not None:
        req.max_new_tokens = max_new_tokens
    if stop_at_eos is not None:
        req.stop_at_eos = stop_at_eos
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(req.sampling, name, value)
    rec = req.recipe
    rec.preset = preset or ""
    for name, value in (
        ("method", method),
        ("solver", solver),
        ("beta", beta),
        ("interp_lambda", interp_lambda),
        ("max_alpha", max_alpha),
        ("model", model),
        ("inner", route_inner),
        ("tau", route_tau),
        ("top_k", route_top_k),
        ("min_similarity", route_min_similarity),
    ):
        if value is not None:
            setattr(rec, name, value)
    rec.experts.extend(experts)
    rec.alphas.extend(float(a) for a in alphas)
    if draft_model is not None or num_draft_tokens is not None or adaptive_draft:
        req.speculative.draft_model = draft_model or ""
        req.speculative.adaptive = adaptive_draft
        if num_draft_tokens is not None:
            req.speculative.num_draft_tokens = num_draft_tokens
    return req


def _weights(w: pb.StepWeights) -> dict[str, float]:
    return {e.expert: e.weight for e in w.experts}


def _recipe_info(r: pb.RecipeInfo) -> RecipeInfo:
    return RecipeInfo(
        name=r.name,
        method=r.method,
        models=list(r.models),
        experts=list(r.experts),
        solver=r.solver,
        alphas=list(r.alphas),
        description=r.description,
        is_default=r.is_default,
    )


def message_to_dict(msg: Any) -> dict[str, Any]:
    """A protobuf message -> plain Python values (ints stay ints, unlike the JSON mapping's int64 strings)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.message_type is not None:
            value = [message_to_dict(v) for v in value] if f.is_repeated else message_to_dict(value)
        elif f.is_repeated:
            value = list(value)
        out[f.name] = value
    return out


def _loss(msg: pb.StepWeights) -> float | None:
    return msg.loss if msg.HasField("loss") else None


def _completion(request_id: str, text: str, token_ids: list[int], reason: int, usage: pb.Usage,
                weights: list[dict[str, float]], losses: list[float | None], **extra: str) -> Completion:
    """A Completion from what Generate and the end of GenerateStream both carry (extra: recipe, stop)."""
    return Completion(
        request_id=request_id,
        text=text,
        token_ids=token_ids,
        finish_reason=_FINISH.get(reason),
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        steps=usage.steps,
        weights=weights,
        losses=losses,
        drafted_tokens=usage.drafted_tokens,
        accepted_tokens=usage.accepted_tokens,
        **extra,
    )


def completion_from_pb(resp: pb.GenerateResponse) -> Completion:
    return _completion(resp.request_id, resp.text, list(resp.token_ids), resp.finish_reason, resp.usage,
                       [_weights(s) for s in resp.steps], [_loss(s) for s in resp.steps], recipe=resp.recipe)


# ------------------------------------------------------------------------------------------------ the client


class GenerationStream:
    """The tokens of one GenerateStream call, as they arrive. After the last one, ``completion`` is set.

    Iterating raises the service's exception (errors.FusionError) if the call fails; ``cancel()`` ends the call
    (the server then frees the request's sequences on every model).
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self.request_id = ""
        self.completion: Completion | None = None
        self._tokens: list[int] = []
        self._weights: list[dict[str, float]] = []
        self._losses: list[float | None] = []

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            for msg in self._call:
                self.request_id = msg.request_id
                weights = _weights(msg.weights)
                loss = _loss(msg.weights)
                if msg.tokens:
                    self._weights.append(weights)
                    self._losses.append(loss)
                for t in msg.tokens:
                    self._tokens.append(t.id)
                    yield TokenEvent(msg.request_id, t.id, t.text, t.index, msg.weights.step, weights, loss)
                if msg.HasField("finished"):
                    f = msg.finished
                    self.completion = _completion(msg.request_id, f.text, list(self._tokens), f.reason, f.usage,
                                                  list(self._weights), list(self._losses), stop=f.stop)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def cancel(self) -> None:
        self._call.cancel()


class FusionClient:
    """A blocking client of one deployment's gRPC ingress (Ray Serve's gRPC proxy, or any FusionService server)."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 60.0,
        token: str | None = None,
        application: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.address = address
        self.timeout_s = timeout_s
        self._metadata: list[tuple[str, str]] = []
        if token:
            self._metadata.append(("authorization", f"Bearer {token}"))
        if application:
            self._metadata.append(("application", application))  # Ray Serve routes by this when it has several apps
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self._stub = fusion_pb2_grpc.FusionServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> FusionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _meta(self, request_id: str = "") -> list[tuple[str, str]]:
        return self._metadata + ([("request_id", request_id)] if request_id else [])

    def send(self, request: pb.GenerateRequest, timeout_s: float | None = None) -> Completion:
        """Unary Generate with a prepared request."""
        try:
            resp = self._stub.Generate(
                request, timeout=timeout_s or self.timeout_s, metadata=self._meta(request.request_id)
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return completion_from_pb(resp)

    def send_stream(self, request: pb.GenerateRequest, timeout_s: float | None = None) -> GenerationStream:
        """GenerateStream with a prepared request."""
        call = self._stub.GenerateStream(
            request, timeout=timeout_s or self.timeout_s, metadata=self._meta(request.request_id)
        )
        return GenerationStream(call)

    def generate(self, prompt: str | Sequence[int], *, timeout_s: float | None = None, **kw: Any) -> Completion:
        """Generate a completion (keyword arguments: see build_request)."""
        return self.send(build_request(prompt, **kw), timeout_s)

    def generate_stream(
        self, prompt: str | Sequence[int], *, timeout_s: float | None = None, **kw: Any
    ) -> GenerationStream:
        """Stream a completion token by token (keyword arguments: see build_request)."""
        return self.send_stream(build_request(prompt, **kw), timeout_s)

    def list_recipes(self) -> list[RecipeInfo]:
        try:
            resp = self._stub.ListRecipes(pb.ListRecipesRequest(), timeout=self.timeout_s, metadata=self._meta())
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return [_recipe_info(r) for r in resp.recipes]

    def describe(self) -> dict[str, Any]:
        """Models, presets and limits of the deployment, as a plain dict (field names as in fusion.proto)."""
        try:
            resp = self._stub.Describe(pb.DescribeDeploymentRequest(), timeout=self.timeout_s, metadata=self._meta())
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return message_to_dict(resp)

    def health(self, service: str = "") -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", ... (raises NotFound for an unknown service)."""
        try:
            resp = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s, metadata=self._meta()
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


# ------------------------------------------------------------------------------------------------ CLI


def _weights_line(index: int, step: int, weights: dict[str, float]) -> str:
    body = " ".join(f"{k}={v:.3f}" for k, v in weights.items()) or "(no experts)"
    return f"  token {index:4d}  step {step:4d}  {body}"


def generate_main(args: argparse.Namespace) -> int:
    """`logitfusion generate --address HOST:PORT "prompt"`: stream the text to stdout, then the weights to stderr."""
    kw: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "preset": args.preset or "",
        "solver": args.solver,
        "route_inner": getattr(args, "route_inner", None),
        "route_tau": getattr(args, "route_tau", None),
        "route_top_k": getattr(args, "route_top_k", None),
        "draft_model": getattr(args, "draft", None),
        "num_draft_tokens": getattr(args, "draft_tokens", None),
        "adaptive_draft": bool(getattr(args, "adaptive_draft", False)),
    }
    try:
        with FusionClient(args.address, timeout_s=args.timeout_s) as client:
            stream = client.generate_stream(args.prompt, **kw)
            tokens: list[tuple[int, int, dict[str, float]]] = []
            for tok in stream:
                sys.stdout.write(tok.text)
                sys.stdout.flush()
                tokens.append((tok.index, tok.step, tok.weights))
    except FusionError as e:
        sys.stderr.write(f"\nerror: {e.code.name}: {e}\n")
        return 1
    sys.stdout.write("\n")
    done = stream.completion
    if done is not None:
        sys.stderr.write(
            f"[{done.request_id}] finish={done.finish_reason} prompt_tokens={done.prompt_tokens} "
            f"completion_tokens={done.completion_tokens} steps={done.steps}"
            + (f" drafted={done.drafted_tokens} accepted={done.accepted_tokens} "
               f"acceptance={done.acceptance_rate:.2f}" if done.acceptance_rate is not None else "")
            + "\n"
        )
    if any(w for _, _, w in tokens):
        sys.stderr.write("expert weights per token:\n")
        for index, step, w in tokens:
            sys.stderr.write(_weights_line(index, step, w) + "\n")
    return 0

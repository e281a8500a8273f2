"""Conversion at the edge: FusionService's protobuf messages <-> the engine's types, checked once.

``request_from_pb`` checks every field of a GenerateRequest against the deployment's limits (each message names the
field and the limit) and builds the Decoder's GenerationRequest, with a recipe that comes back validated (the engine
trusts it); ``chunk_to_pb``, ``response_from_chunks`` and ``describe_to_pb`` go back. Both frontends use it: the gRPC
one (cluster.serve_app) and the HTTP one (cluster.http_app, which builds a GenerateRequest from its JSON so that the
same checks apply).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from logitfusion import __version__
from logitfusion.actors.coordinator import FinishInfo, StreamChunk, TextCodec
from logitfusion.cluster.topology import Limits, Topology
from logitfusion.engine.decoder import GenerationRequest, SpeculativeConfig
from logitfusion.engine.runner import RunnerInfo
from logitfusion.errors import InvalidRequest
from logitfusion.fusion import SamplingParams
from logitfusion.fusion.methods import FIELDS as RECIPE_FIELDS
from logitfusion.v1 import fusion_pb2 as pb

MAX_TEMPERATURE = 100.0
_FINISH_TO_PB = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP}


# ------------------------------------------------------------------------------------------------ edge: from_pb


def _check_real(name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> float:
    ok = math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise InvalidRequest(f"{name}: {value} must be finite and in {bound}", field=name)
    return value


def recipe_overrides(sel: pb.RecipeSelection) -> dict[str, Any]:
    """The fields a request set on its recipe, as topology.RecipeSpec fields."""
    out: dict[str, Any] = {}
    for name in ("method", *RECIPE_FIELDS):  # every field of the recipe table (tested against fusion.proto)
        if name in ("experts", "alphas"):
            if getattr(sel, name):
                out[name] = tuple(getattr(sel, name))
        elif sel.HasField(name):
            out[name] = getattr(sel, name)
    return out


def check_prompt_length(prompt: Sequence[int], where: str, limits: Limits) -> None:
    """Refuse a prompt over limits.max_prompt_tokens, naming the request field ``where``."""
    if len(prompt) > limits.max_prompt_tokens:
        raise InvalidRequest(
            f"{where}: the prompt has {len(prompt)} tokens, over the limit max_prompt_tokens "
            f"({limits.max_prompt_tokens})",
            field=where,
        )


def request_from_pb(
    msg: pb.GenerateRequest, *, topology: Topology, codec: TextCodec, vocab_size: int, request_id: str
) -> GenerationRequest:
    """GenerateRequest -> the engine's GenerationRequest, checking every field against the deployment's limits.

    The message itself passed its edge's size check once already (check_message in FusionFrontend._submit; the
    HTTP body's in HttpFrontend.read_json), and the recipe comes back validated: the Decoder trusts it."""
    limits = topology.limits
    if len(msg.request_id) > limits.max_request_id_chars:
        raise InvalidRequest(
            f"request_id: {len(msg.request_id)} characters exceed the limit max_request_id_chars "
            f"({limits.max_request_id_chars})",
            field="request_id",
        )
    kind = msg.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("prompt: set either text or token_ids", field="prompt")
    if kind == "text":
        if not msg.text:
            raise InvalidRequest("text: the prompt must not be empty", field="text")
        prompt = codec.encode(msg.text)
        where = "text"
    else:
        prompt = list(msg.token_ids.ids)
        where = "token_ids.ids"
        if not prompt:
            raise InvalidRequest("token_ids.ids: the prompt must not be empty", field=where)
        for i, t in enumerate(prompt):
            if not 0 <= t < vocab_size:
                raise InvalidRequest(f"token_ids.ids[{i}]: {t} is outside [0, vocab_size={vocab_size})", field=where)
    check_prompt_length(prompt, where, limits)
    max_new = msg.max_new_tokens if msg.HasField("max_new_tokens") else limits.default_max_new_tokens
    if not 1 <= max_new <= limits.max_new_tokens:
        raise InvalidRequest(
            f"max_new_tokens: {max_new} must be in [1, {limits.max_new_tokens}] (the limit max_new_tokens)",
            field="max_new_tokens",
        )
    s = msg.sampling
    temperature = _check_real("sampling.temperature", s.temperature, 0.0, MAX_TEMPERATURE) if s.HasField(
        "temperature"
    ) else 0.0
    top_p = _check_real("sampling.top_p", s.top_p, 0.0, 1.0, lo_open=True) if s.HasField("top_p") else 1.0
    top_k = s.top_k if s.HasField("top_k") else 0
    if not 0 <= top_k <= vocab_size:
        raise InvalidRequest(f"sampling.top_k: {top_k} must be in [0, vocab_size={vocab_size}]", field="sampling.top_k")
    seed = s.seed if s.HasField("seed") else None
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    try:
        sampling.validate()
    except ValueError as exc:
        raise InvalidRequest(f"sampling: {exc}", field="sampling") from None
    if len(msg.stop) > limits.max_stop_strings:
        raise InvalidRequest(
            f"stop: {len(msg.stop)} stop strings, over the limit max_stop_strings ({limits.max_stop_strings})",
            field="stop",
        )
    for i, text in enumerate(msg.stop):
        if not text or len(text) > limits.max_stop_string_chars:
            raise InvalidRequest(
                f"stop[{i}]: {len(text)} characters must be in [1, {limits.max_stop_string_chars}] "
                "(the limit max_stop_string_chars)",
                field=f"stop[{i}]",
            )
    _, recipe = topology.resolve_recipe(msg.recipe.preset or None, recipe_overrides(msg.recipe))
    stop_ids = () if msg.HasField("stop_at_eos") and not msg.stop_at_eos else None
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=tuple(prompt),
        recipe=recipe,
        sampling=sampling,
        max_new_tokens=int(max_new),
        stop_strings=tuple(msg.stop),
        stop_token_ids=stop_ids,
        speculative=speculative_from_pb(msg, topology) if msg.HasField("speculative") else None,
    )


def speculative_from_pb(msg: pb.GenerateRequest, topology: Topology) -> SpeculativeConfig | None:
    """GenerateRequest.speculative -> the Decoder's SpeculativeConfig (None: plain decoding), checked by name."""
    spec = msg.speculative
    if not spec.draft_model:
        if spec.HasField("num_draft_tokens") or spec.adaptive:
            raise InvalidRequest("speculative.draft_model: set it to one of this deployment's models to draft with",
                                 field="speculative.draft_model")
        return None
    names = [m.name for m in topology.models]
    if spec.draft_model not in names:
        raise InvalidRequest(
            f"speculative.draft_model: {spec.draft_model!r} is not a model of this deployment (models: "
            f"{', '.join(names)})",
            field="speculative.draft_model",
        )
    limit = topology.limits.max_draft_tokens
    k = spec.num_draft_tokens if spec.HasField("num_draft_tokens") else min(4, limit)
    if not 1 <= k <= limit:
        raise InvalidRequest(
            f"speculative.num_draft_tokens: {k} must be in [1, {limit}] (the limit max_draft_tokens)",
            field="speculative.num_draft_tokens",
        )
    return SpeculativeConfig(spec.draft_model, num_draft_tokens=int(k), adaptive=spec.adaptive, max_draft_tokens=limit)


# ------------------------------------------------------------------------------------------------ edge: to_pb


def _weights_pb(chunk: StreamChunk) -> pb.StepWeights:
    msg = pb.StepWeights(step=chunk.step, experts=[pb.ExpertWeight(expert=e, weight=w) for e, w in chunk.weights])
    if chunk.loss is not None:
        msg.loss = chunk.loss  # the solved DLF objective; unset for static recipes
    return msg


def _usage_pb(f: FinishInfo) -> pb.Usage:
    return pb.Usage(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens, steps=f.steps,
                    drafted_tokens=f.drafted_tokens, accepted_tokens=f.accepted_tokens)


def chunk_to_pb(chunk: StreamChunk) -> pb.GenerateStreamResponse:
    out = pb.GenerateStreamResponse(
        request_id=chunk.request_id,
        tokens=[pb.Token(id=t.token_id, text=t.text, index=t.index) for t in chunk.tokens],
        weights=_weights_pb(chunk),
    )
    f = chunk.finished
    if f is not None:
        out.finished.CopyFrom(
            pb.Finished(
                reason=_FINISH_TO_PB[f.reason],
                usage=_usage_pb(f),
                stop=f.stop,
                text=f.text,
            )
        )
    return out


def response_from_chunks(chunks: Sequence[StreamChunk], recipe: str) -> pb.GenerateResponse:
    """The chunks of one finished request -> GenerateResponse."""
    last = chunks[-1].finished
    if last is None:
        raise RuntimeError("response_from_chunks: the last chunk does not finish the request")
    return pb.GenerateResponse(
        request_id=chunks[-1].request_id,
        text=last.text,
        token_ids=[t.token_id for c in chunks for t in c.tokens],
        finish_reason=_FINISH_TO_PB[last.reason],
        usage=_usage_pb(last),
        steps=[_weights_pb(c) for c in chunks],
        recipe=recipe,
    )


def recipes_to_pb(topology: Topology) -> list[pb.RecipeInfo]:
    out = []
    for name in sorted(topology.presets):
        spec, recipe = topology.presets[name], topology.recipe(name)
        out.append(
            pb.RecipeInfo(
                name=name,
                method=spec.method,
                models=list(recipe.model_names()),
                experts=list(recipe.experts),
                solver=recipe.solver or "",
                alphas=list(recipe.alphas),
                description=_describe_recipe(spec.description, recipe),
                is_default=name == topology.default_preset,
            )
        )
    return out


def _describe_recipe(description: str, recipe: Any) -> str:
    """The preset's own line; a routed preset also says how it routes (its parameters are no RecipeInfo field)."""
    r = recipe.route
    if r is None:
        return description
    inner = f"dlf ({recipe.solver})" if recipe.solver else f"static alphas {list(recipe.alphas)}"
    k = "every expert" if r.top_k == 0 else f"top {r.top_k}"
    how = (
        f"routed on the prompt ({r.model}'s mean last hidden state, {'centred ' if r.centre else ''}cosine to "
        f"{sum(len(e) for e in r.examples)} example prompts): softmax(sim / {r.tau}) over {k}, the large base alone "
        f"below similarity {r.min_similarity}; inner {inner}"
    )
    return f"{description} [{how}]" if description else how


def limits_to_pb(limits: Limits) -> pb.Limits:
    return pb.Limits(**{f.name: getattr(limits, f.name) for f in pb.Limits.DESCRIPTOR.fields})


def describe_to_pb(topology: Topology, infos: Mapping[str, RunnerInfo], eos_token_ids: Sequence[int]) -> Any:
    models = []
    for m in topology.models:
        info = infos[m.name]
        models.append(
            pb.ModelInfo(
                name=m.name,
                role=m.role,
                vocab_size=info.vocab_size,
                vocab_fingerprint=info.vocab_fingerprint,
                max_length_tokens=info.max_length_tokens,
                dtype=info.dtype,
                device=info.device,
                num_parameters=info.num_parameters,
            )
        )
    first = infos[topology.models[0].name]
    return pb.DescribeDeploymentResponse(
        version=__version__,
        models=models,
        recipes=recipes_to_pb(topology),
        default_preset=topology.default_preset,
        limits=limits_to_pb(topology.limits),
        vocab_size=first.vocab_size,
        eos_token_id=eos_token_ids[0] if eos_token_ids else -1,
    )

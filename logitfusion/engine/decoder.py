"""The Decoder: continuous batching of fused requests over any set of ModelRunners.

One step, for every live request at once:
  plan     per runner, one StepPlan: prefill of newly admitted requests, the last chosen token of running ones,
           truncates after a speculative rollback, releases of finished and aborted ones;
  execute  submit every plan, then wait on every future: the models run concurrently;
  fuse     group rows by recipe, fuse (the DLF weights are solved per row) and sample with each request's own
           seeded generator (speculative requests: accept or reject the drafted tokens);
  update   append the tokens, check the stops, emit one StepEvent per token.

A request reads only the models of its recipe (plus its draft model when speculative): a request for the large
base alone never touches an expert. Each model may see its own prompt (``model_prompts``, e.g. a chat template or
few-shot examples for the large model); all share the generated continuation.

The Decoder keeps, per request and model, how many tokens the runner holds (``held``) and how many of those are
still right (``valid``); a plan sends the missing suffix of the model's history, so a prefill, a decode step, the
catch-up after a speculative rollback and the re-send after a worker restart (``resync``) are one code path.

A runner that does not answer within ``stall_timeout_s`` is *pending*: the step goes on without it, and every
request that reads it is *parked* (not planned, fused or sampled) until its answer arrives; the next steps send it
nothing and poll its future. The other requests are not held up by a stalled worker. A parked request ends the
usual ways (abort, the coordinator's deadline); when the late answer comes, what the runner now holds is recorded as
for any answer (a request that ended meanwhile gets its release), and a failure is raised as the StepFailed of
that step.

Threads: ``step()`` is driven by one loop thread; ``add_request`` and ``abort`` may be called from any thread.
"""

from __future__ import annotations

import logging
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field, replace

import torch

from logitfusion.engine.routing import RouteTables, split_features
from logitfusion.engine.runner import ExtendOp, ModelRunner, RunnerInfo, StepPlan, Want, concat_rows, failed
from logitfusion.fusion import Recipe, SamplingParams, fuse, make_generator, native, sample, speculative_accept, to_probs
from logitfusion.fusion.routing import Routing, route

logger = logging.getLogger(__name__)

FINISH_STOP = "stop"  # a stop token (EOS by default) or a stop string
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_ABORT = "abort"  # abort(request_id)
FINISH_TIMEOUT = "timeout"  # run(timeout_s=...): ran longer than that, aborted
FINISH_INVALID = "invalid"  # run(): refused by add_request (GenerationResult.error says why)
_PENDING_POLL_S = 0.05  # a step with only parked requests waits this long on the pending runners, then returns


# ----------------------------------------------------------------------------------------------------------------
# Public types
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative fused decoding (docs/algorithms.md §8): a small model drafts, every other model verifies at once."""

    draft_model: str  # the model that proposes tokens (usually a small expert of the recipe)
    num_draft_tokens: int = 4  # k: tokens drafted per step (the starting k when adaptive)
    adaptive: bool = False  # grow k after a fully accepted draft, shrink it after a mostly rejected one
    max_draft_tokens: int = 8  # upper bound of k when adaptive

    def validate(self) -> None:
        if not self.draft_model:
            raise ValueError("speculative.draft_model must name a model")
        if not 1 <= self.num_draft_tokens <= 64:
            raise ValueError(f"speculative.num_draft_tokens={self.num_draft_tokens} must be in 1..64")
        if not self.num_draft_tokens <= self.max_draft_tokens <= 64:
            raise ValueError(
                f"speculative.max_draft_tokens={self.max_draft_tokens} must be in "
                f"num_draft_tokens ({self.num_draft_tokens})..64"
            )


@dataclass(frozen=True)
class GenerationRequest:
    """One fused generation."""

    request_id: str
    prompt_ids: Sequence[int]  # the prompt every model sees unless model_prompts overrides it
    recipe: Recipe
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 64
    stop_strings: tuple[str, ...] = ()  # needs the Decoder's decode_fn
    stop_token_ids: tuple[int, ...] | None = None  # None -> the Decoder's eos_token_ids; () -> none
    model_prompts: Mapping[str, Sequence[int]] = field(default_factory=dict)  # model name -> its own prompt
    speculative: SpeculativeConfig | None = None


@dataclass(frozen=True)
class StepEvent:
    """One generated token of one request (or the end of an aborted request, with token_id None)."""

    request_id: str
    token_id: int | None
    text_delta: str  # new text since the last event ("" without a decode_fn)
    alphas: tuple[float, ...]  # the fusion weight of each recipe expert for this token
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    step: int  # the Decoder step that produced the event
    num_drafted_tokens: int = 0  # the request's speculative totals so far (0 without speculation)
    num_accepted_tokens: int = 0
    loss: float | None = None  # the DLF objective at the solved weights of this token (None for static recipes)
    result: GenerationResult | None = None  # on the final event: the whole request (tokens, text, why it ended)


@dataclass
class GenerationResult:
    """A finished request. finish_reason "stop" with ``stop`` empty: a stop token ended it (EOS by default)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    weights: list[list[float]]  # [steps][T]: the alphas of every generated token
    experts: tuple[str, ...]  # the names of the T experts, in weights' column order
    num_steps: int  # Decoder steps the request took part in
    num_drafted_tokens: int = 0
    num_accepted_tokens: int = 0
    route: tuple[float, ...] = ()  # routed recipes: the weight w_t of each expert from the prompt (all 0: "none")
    stop: str = ""  # the stop string that ended it ("" for a stop token, the length limit or an abort)
    error: str = ""  # finish_reason "invalid": why add_request refused it

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens (None when nothing was drafted)."""
        return self.num_accepted_tokens / self.num_drafted_tokens if self.num_drafted_tokens else None


class DecoderOverloaded(RuntimeError):
    """The waiting queue is full; retry later."""


class StepFailed(RuntimeError):
    """A runner failed during a step. The step's tokens were not emitted; the requests stay live, so the caller
    can retry the step (after ``resync(model)`` if that model lost its caches) or abort them."""

    def __init__(self, model: str, cause: BaseException) -> None:
        super().__init__(f"runner {model!r} failed: {cause}")
        self.model = model
        self.cause = cause


# ----------------------------------------------------------------------------------------------------------------
# Per-request state
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Live:
    request: GenerationRequest
    models: tuple[str, ...]  # every model the request reads: the recipe's, plus the draft model
    prompts: dict[str, tuple[int, ...]]  # model -> its prompt
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    draft_k: int = 0  # current k (0: not speculative)
    generated: list[int] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    held: dict[str, int] = field(default_factory=dict)  # model -> tokens the runner holds for this request
    valid: dict[str, int] = field(default_factory=dict)  # model -> of those, the prefix that is still right
    text: str = ""  # text emitted so far
    decoded: str = ""  # text of the generated tokens so far, complete characters only (>= text)
    detok: IncrementalText | None = None
    finish_reason: str | None = None
    stop: str = ""  # the stop string that ended it
    num_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    route: torch.Tensor | None = None  # routed recipes: [T] expert weights, set by the prefill of the routing model

    @property
    def rid(self) -> str:
        return self.request.request_id

    def history(self, model: str) -> tuple[int, ...]:
        """What the model should have cached for this request: its prompt and every generated token."""
        return self.prompts[model] + tuple(self.generated)

    def result(self) -> GenerationResult:
        return GenerationResult(
            request_id=self.rid,
            token_ids=list(self.generated),
            text=self.text,
            finish_reason=self.finish_reason or FINISH_ABORT,
            weights=[list(w) for w in self.weights],
            experts=tuple(self.request.recipe.experts),
            num_steps=self.num_steps,
            num_drafted_tokens=self.drafted,
            num_accepted_tokens=self.accepted,
            route=tuple(float(w) for w in self.route) if self.route is not None else (),
            stop=self.stop,
        )


@dataclass
class _Draft:
    """What the draft model proposed for one request in this step."""

    k: int  # tokens to draft
    tokens: list[int] = field(default_factory=list)  # y_1..y_k
    raw: list[torch.Tensor] = field(default_factory=list)  # the draft's logits before each y_i: k x [V]
    q: list[torch.Tensor] = field(default_factory=list)  # the draft's sampling distribution before each y_i


@dataclass
class _Round:
    """The ops of one round of runner calls, per model, and whose rows each extend carries."""

    extends: dict[str, list[ExtendOp]] = field(default_factory=dict)
    truncates: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    releases: dict[str, list[str]] = field(default_factory=dict)
    owners: dict[str, list[tuple[_Live, int, int]]] = field(default_factory=dict)  # (request, new held, rows kept)
    featured: dict[str, list[_Live]] = field(default_factory=dict)  # per model, whose extends carry features_tokens

    def plans(self) -> dict[str, StepPlan]:
        names = set(self.extends) | set(self.truncates) | set(self.releases)
        return {
            m: StepPlan(
                extends=tuple(self.extends.get(m, ())),
                truncates=tuple(self.truncates.get(m, ())),
                releases=tuple(self.releases.get(m, ())),
            )
            for m in sorted(names)
        }


@dataclass
class _Pending:
    """A runner's plan that was not answered within stall_timeout_s: what to record when it is."""

    future: Future
    plan: StepPlan
    owners: list[tuple[_Live, int, int]]
    featured: list[_Live]
    since: float  # time.monotonic() at submit


# ----------------------------------------------------------------------------------------------------------------
# Small pure helpers
# ----------------------------------------------------------------------------------------------------------------


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class IncrementalText:
    """Text of a growing token sequence in O(new tokens) per step instead of re-decoding it all (quadratic).

    Decodes a short window: the tokens since the last emitted boundary (``prefix``) and through the newest token.
    The new text is decode(window) minus decode(window before the new tokens): both start at the same token, so a
    tokenizer that treats a first token specially (a leading space dropped) does it to both alike. A window that ends
    inside a multi-byte character (U+FFFD at its end) waits for its next token. ``flush`` gives what is still held,
    replacement character and all, as a whole-sequence decode would.
    """

    __slots__ = ("_decode", "_prefix", "_read")

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text has been returned

    def step(self, ids: Sequence[int]) -> str:
        """The new text once ``ids`` (the whole sequence so far) ends with complete characters, else ""."""
        before = self._decode(ids[self._prefix : self._read])
        now = self._decode(ids[self._prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(ids)
        return now[len(before) :]

    def flush(self, ids: Sequence[int]) -> str:
        """Everything of ``ids`` not returned yet, even an incomplete character."""
        before = self._decode(ids[self._prefix : self._read])
        now = self._decode(ids[self._prefix :])
        self._prefix = self._read = len(ids)
        return now[len(before) :] if now.startswith(before) else now


def resolve_fusion_device(device: str | torch.device) -> torch.device:
    """ "auto" -> cuda when this process sees a GPU, else cpu; anything else as torch.device reads it."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _loss_at(loss: torch.Tensor | None, row: int) -> float | None:
    """The DLF objective of one fused row, or None (static recipe)."""
    return None if loss is None else float(loss[row])


def _find_stop(text: str, stops: Sequence[str], start: int) -> int:
    """The earliest index >= start - (longest stop - 1) where a stop string begins in text, or -1."""
    if not stops:
        return -1
    lo = max(0, start - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, lo) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stops: Sequence[str]) -> str:
    """The text safe to stream: without a partial multi-byte character at its end, nor an end that could be the
    start of a stop string (it is streamed once the next tokens show it is not)."""
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return text[: len(text) - hold]


def _adapt_k(k: int, accepted: int, cfg: SpeculativeConfig) -> int:
    """Adaptive draft length: one more after a fully accepted draft, one fewer after accepting less than half."""
    if accepted == k:
        return min(k + 1, cfg.max_draft_tokens)
    if accepted < k // 2:
        return max(1, k - 1)
    return k


# ----------------------------------------------------------------------------------------------------------------
# The Decoder
# ----------------------------------------------------------------------------------------------------------------


class Decoder:
    """Fused decoding with continuous batching over ``runners`` (model name -> ModelRunner).

    eos_token_ids: the default stop tokens. decode_fn: token ids -> text, for text output and stop strings.
    max_batch_size: requests decoded at once (the rest wait, first come first served). max_new_tokens_limit: the
    largest max_new_tokens a request may ask for. max_waiting_requests: the queue bound (DecoderOverloaded beyond).
    """

    def __init__(
        self,
        runners: Mapping[str, ModelRunner],
        *,
        eos_token_ids: Iterable[int] = (),
        decode_fn: Callable[[Sequence[int]], str] | None = None,
        max_batch_size: int = 16,
        max_new_tokens_limit: int = 1024,
        max_waiting_requests: int = 1024,
        fusion_device: str | torch.device = "auto",
        stall_timeout_s: float | None = 2.0,
    ) -> None:
        """stall_timeout_s: how long a step waits for a runner before it goes on without it and parks the requests
        that read it (None: wait for every runner, however long).

        fusion_device: where fusion, the DLF solve and the speculative targets are computed ("auto": the GPU when
        this process sees one, else the CPU; see ``resolve_fusion_device``). The runner contract
        returns fp32 CPU logits; with "cuda" they are copied to the GPU for fusion (the solver is many [B, V]
        passes, which the GPU does in well under a millisecond) and the fused log-probs come back for sampling."""
        if not runners:
            raise ValueError("runners must name at least one model")
        try:
            self.fusion_device = resolve_fusion_device(fusion_device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"fusion_device={fusion_device!r} is not a torch device: {exc}") from None
        if self.fusion_device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"fusion_device={fusion_device!r}: CUDA is not available on this machine")
        if self.fusion_device.type == "cpu":
            native.kernels()  # build / load the DLF kernels now, not inside the first request's step (once a process)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        if max_new_tokens_limit < 1:
            raise ValueError(f"max_new_tokens_limit={max_new_tokens_limit} must be >= 1")
        if max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests={max_waiting_requests} must be >= 1")
        if stall_timeout_s is not None and not stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s={stall_timeout_s} must be > 0 (or None: wait for every runner)")
        self.stall_timeout_s = stall_timeout_s
        self._runners = dict(runners)
        self._info: dict[str, RunnerInfo] = {name: r.describe() for name, r in self._runners.items()}
        self.vocab_size = self._check_vocabularies(self._info)
        self._eos = tuple(int(t) for t in eos_token_ids)
        bad = [t for t in self._eos if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"eos_token_ids has {bad[0]} outside 0..{self.vocab_size - 1}")
        self._decode = decode_fn
        self.max_batch_size = max_batch_size
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_waiting_requests = max_waiting_requests

        self._lock = threading.Lock()  # guards _waiting, _aborts, _outbox, _ids (touched by other threads)
        self._step_lock = threading.Lock()  # one step (or release flush) at a time
        self._waiting: deque[GenerationRequest] = deque()
        self._aborts: set[str] = set()
        self._outbox: list[StepEvent] = []
        self._ids: set[str] = set()  # every request id not finished yet (waiting or live)
        self._live: dict[str, _Live] = {}  # admission order
        self._releases: dict[str, set[str]] = {m: set() for m in self._runners}  # model -> seq ids to free
        self._pending: dict[str, _Pending] = {}  # model -> its unanswered plan (a stalled runner gets no other)
        self._step = 0
        self.fusion_time_s = 0.0  # total seconds spent fusing and solving the weights (metrics read the deltas)
        self._route_tables = RouteTables()  # routed recipes' example tables, computed on first use

    @staticmethod
    def _check_vocabularies(info: Mapping[str, RunnerInfo]) -> int:
        names = sorted(info)
        first = info[names[0]]
        for name in names[1:]:
            other = info[name]
            if other.vocab_fingerprint != first.vocab_fingerprint:
                raise ValueError(
                    f"models {names[0]!r} and {name!r} have different vocabularies (fingerprints "
                    f"{first.vocab_fingerprint[:12]}.. vs {other.vocab_fingerprint[:12]}..): fusion needs one tokenizer"
                )
            if other.vocab_size != first.vocab_size:
                raise ValueError(
                    f"models {names[0]!r} and {name!r} report vocab_size {first.vocab_size} vs {other.vocab_size}"
                )
        return first.vocab_size

    # ------------------------------------------------------------------------------------------------ requests

    def add_request(self, request: GenerationRequest) -> None:
        """Validate and queue a request; it joins the batch at the next step. Its final StepEvent carries its
        GenerationResult."""
        self._validate(request)
        with self._lock:
            if request.request_id in self._ids:
                raise ValueError(f"request_id {request.request_id!r} is already in use by an unfinished request")
            if len(self._waiting) >= self.max_waiting_requests:
                raise DecoderOverloaded(
                    f"{len(self._waiting)} requests are waiting (max_waiting_requests={self.max_waiting_requests})"
                )
            self._ids.add(request.request_id)
            self._waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its caches on every runner. Returns False if it is unknown or finished.

        The caches are freed at once when no step is running, else by the next step; either way the next step
        returns the request's final event (finish_reason "abort").
        """
        with self._lock:
            if request_id not in self._ids:
                return False
            self._aborts.add(request_id)
        if self._step_lock.acquire(blocking=False):
            try:
                self._retire_aborted()
                self._flush_releases()
            finally:
                self._step_lock.release()
        return True

    def has_work(self) -> bool:
        """True while a step() call would do anything: requests to run, events to hand out or caches to free."""
        with self._lock:
            if self._waiting or self._aborts or self._outbox:
                return True
        return bool(self._live) or bool(self._pending) or any(self._releases.values())

    def pending_models(self) -> frozenset[str]:
        """Models whose runner has not answered a plan within stall_timeout_s (their requests are parked)."""
        return frozenset(self._pending)

    def live_request_ids(self) -> list[str]:
        """Ids of every unfinished request, running or waiting."""
        with self._lock:
            return sorted(self._ids)

    def resync(self, model: str) -> None:
        """Forget what ``model`` holds (e.g. its worker restarted empty): the next step re-sends every history."""
        if model not in self._runners:
            raise ValueError(f"unknown model {model!r}; known: {sorted(self._runners)}")
        with self._step_lock:
            for live in self._live.values():
                if model in live.held:
                    live.held[model] = live.valid[model] = 0
            self._releases[model].clear()
            self._pending.pop(model, None)  # a restarted worker answers nothing of the old one

    def run(
        self,
        requests: Iterable[GenerationRequest],
        *,
        timeout_s: float | None = None,
        on_step: Callable[[list[StepEvent]], None] | None = None,
    ) -> Iterator[GenerationResult]:
        """Add ``requests`` and step until every one of them has finished, yielding each result as it finishes.

        The one loop that drives a Decoder to completion (generate, the zoo evaluation, the Ray-job pipeline and the
        benchmarks use it; the service's Coordinator steps the Decoder itself, between aborts and scoring jobs). A
        request that add_request refuses is yielded at once, finish_reason "invalid" with the error; one running
        longer than ``timeout_s`` (from its add) is aborted and yielded with finish_reason "timeout". ``on_step``
        sees every step's events. Requests already queued by others are stepped along but not yielded. Closing the
        iterator early, or an exception, aborts the given requests that are still running.
        """
        running: set[str] = set()
        deadlines: dict[str, float] = {}
        timed_out: set[str] = set()
        try:
            for req in requests:
                try:
                    self.add_request(req)
                except ValueError as exc:  # names the field and the limit
                    yield GenerationResult(req.request_id, [], "", FINISH_INVALID, [], tuple(req.recipe.experts), 0,
                                           error=str(exc))
                    continue
                running.add(req.request_id)
                if timeout_s is not None:
                    deadlines[req.request_id] = time.monotonic() + timeout_s
            while running:
                now = time.monotonic()
                for rid in [rid for rid, t in deadlines.items() if now >= t]:
                    del deadlines[rid]
                    timed_out.add(rid)
                    self.abort(rid)  # its final event (and result) comes with the next step
                events = self.step()
                if on_step is not None:
                    on_step(events)
                for ev in events:
                    if ev.result is None or ev.request_id not in running:
                        continue
                    running.discard(ev.request_id)
                    deadlines.pop(ev.request_id, None)
                    res = ev.result
                    yield replace(res, finish_reason=FINISH_TIMEOUT) if ev.request_id in timed_out else res
        finally:
            for rid in running:
                self.abort(rid)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run the given requests to completion (with any already queued) and return their results in order.
        Raises ValueError (naming the field and the limit) for a request it refuses, before any step."""
        results: dict[str, GenerationResult] = {}
        with contextlib.closing(self.run(requests)) as finished:
            for res in finished:
                if res.finish_reason == FINISH_INVALID:
                    raise ValueError(res.error)
                results[res.request_id] = res
        return [results[r.request_id] for r in requests]

    # ------------------------------------------------------------------------------------------------ validation

    def _validate(self, req: GenerationRequest) -> None:
        """Raise ValueError naming the field and the limit."""
        if not isinstance(req.request_id, str) or not req.request_id:
            raise ValueError("request_id must be a non-empty string")
        if not isinstance(req.recipe, Recipe):
            raise ValueError(f"recipe must be a fusion.Recipe, got {type(req.recipe).__name__}")
        req.recipe.validate()  # once, here: a recipe from presets or the topology is trusted already
        if not isinstance(req.sampling, SamplingParams):
            raise ValueError(f"sampling must be a fusion.SamplingParams, got {type(req.sampling).__name__}")
        req.sampling.validate()
        models = set(req.recipe.model_names())
        unknown = sorted(models - set(self._runners))
        if unknown:
            raise ValueError(
                f"recipe {req.recipe.name!r} reads unknown models {unknown}; known: {sorted(self._runners)}"
            )
        if req.speculative is not None:
            req.speculative.validate()
            if req.speculative.draft_model not in self._runners:
                raise ValueError(
                    f"speculative.draft_model {req.speculative.draft_model!r} is unknown; "
                    f"known: {sorted(self._runners)}"
                )
            models.add(req.speculative.draft_model)
        routing = req.recipe.route
        if routing is not None:
            limit = self._info[routing.model].max_length_tokens
            longest = routing.longest_example()
            if longest > limit:
                raise ValueError(f"route.examples: an example prompt of {longest} tokens exceeds {routing.model!r} "
                                 f"max_length_tokens={limit}")
        if not isinstance(req.max_new_tokens, int) or not 1 <= req.max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError(f"max_new_tokens={req.max_new_tokens} must be in 1..{self.max_new_tokens_limit}")
        self._check_ids("prompt_ids", req.prompt_ids)
        stray = sorted(set(req.model_prompts) - models)
        if stray:
            raise ValueError(
                f"model_prompts names {stray}, which the request does not read (it reads {sorted(models)})"
            )
        for name, ids in req.model_prompts.items():
            self._check_ids(f"model_prompts[{name!r}]", ids)
        for name in sorted(models):
            n = len(req.model_prompts.get(name, req.prompt_ids))
            limit = self._info[name].max_length_tokens
            if n + req.max_new_tokens > limit:
                raise ValueError(
                    f"prompt ({n} tokens for model {name!r}) + max_new_tokens ({req.max_new_tokens}) exceeds "
                    f"{name!r} max_length_tokens={limit}"
                )
        if req.stop_strings:
            if self._decode is None:
                raise ValueError("stop_strings need a Decoder with a decode_fn")
            if any(not isinstance(s, str) or not s for s in req.stop_strings):
                raise ValueError("stop_strings must be non-empty strings")
        if req.stop_token_ids is not None:
            bad = [t for t in req.stop_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"stop_token_ids has {bad[0]!r} outside 0..{self.vocab_size - 1}")

    def _check_ids(self, name: str, ids: Sequence[int]) -> None:
        if len(ids) == 0:
            raise ValueError(f"{name} must not be empty")
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{name} has token id {bad[0]!r} outside 0..{self.vocab_size - 1}")

    # ------------------------------------------------------------------------------------------------ the step

    def step(self) -> list[StepEvent]:
        """One fused decoding step for every live request: plan -> execute -> fuse and sample -> update."""
        with self._step_lock, torch.inference_mode():
            self._step += 1
            self._retire_aborted()
            self._admit()
            try:
                self._poll_pending()  # late answers of stalled runners: record them (or raise their failure)
                self._prepare_routes()  # routed requests: their experts' example tables (once per example set)
                drafts = self._draft()  # speculative requests: the draft model proposes k tokens
                logits = self._execute(self._plan(drafts))  # every model, one plan each, concurrently
            except StepFailed:
                self._forget_drafts()
                raise
            events = self._fuse_and_update(logits, drafts)  # fuse + solve + sample, append, stop
            if not self._live:
                self._flush_releases()  # an idle decoder holds no cache anywhere
            with self._lock:
                events, self._outbox = self._outbox + events, []
            return events

    def _forget_drafts(self, lives: Iterable[_Live] | None = None) -> None:
        """After a failed step (or for requests parked in the middle of one): drafted tokens a runner may hold
        are not part of any history."""
        for live in self._live.values() if lives is None else lives:
            for m in live.models:
                live.valid[m] = min(live.valid[m], len(live.prompts[m]) + len(live.generated))

    def _parked(self, live: _Live) -> bool:
        """True while a model the request reads has an unanswered plan."""
        return bool(self._pending) and any(m in self._pending for m in live.models)

    def _ready(self) -> list[_Live]:
        """The live requests that this step plans, fuses and samples: every one not parked."""
        return [live for live in self._live.values() if not self._parked(live)]

    def _poll_pending(self) -> None:
        """Record the answers of runners that were pending. With nothing else to run, wait up to _PENDING_POLL_S
        for one (so a loop over step() does not spin); else only take what has arrived."""
        if not self._pending:
            return
        if not self._ready():
            wait([p.future for p in self._pending.values()], timeout=_PENDING_POLL_S, return_when=FIRST_COMPLETED)
        failure: StepFailed | None = None
        for m, p in list(self._pending.items()):
            if not p.future.done():
                continue
            del self._pending[m]
            logger.warning("step %d: runner %s answered after %.1f s", self._step, m, time.monotonic() - p.since)
            failure = self._collect(m, p.future, p.plan, p.owners, p.featured, {}) or failure
            for live, _, _ in p.owners:
                if self._live.get(live.rid) is not live:
                    self._releases[m].add(live.rid)  # it ended while parked: free what the late answer created
            self._forget_drafts(live for live, _, _ in p.owners)  # their step was not fused: history only
        if failure is not None:
            raise failure

    def _retire_aborted(self) -> None:
        """Take aborted requests out (waiting or live); their caches go on the release lists, their final
        events into the outbox that the next step hands out."""
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            kept = deque(r for r in self._waiting if r.request_id not in aborts)
            dropped = [r for r in self._waiting if r.request_id in aborts]
            self._waiting = kept
        events = []
        for req in dropped:
            never_ran = GenerationResult(req.request_id, [], "", FINISH_ABORT, [], tuple(req.recipe.experts), 0)
            events.append(StepEvent(req.request_id, None, "", (), True, FINISH_ABORT, self._step, result=never_ran))
            with self._lock:
                self._ids.discard(req.request_id)
        for rid in sorted(aborts):
            live = self._live.get(rid)
            if live is not None:
                live.finish_reason = FINISH_ABORT
                self._finish(live)
                events.append(StepEvent(rid, None, "", (), True, FINISH_ABORT, self._step, live.drafted,
                                        live.accepted, result=live.result()))
        with self._lock:
            self._outbox.extend(events)

    def _admit(self) -> None:
        """Move waiting requests into the batch, up to max_batch_size requests that step (parked ones, waiting on a
        stalled runner, do not take a place: they run no forward)."""
        with self._lock:
            running = len(self._ready()) if self._pending else len(self._live)
            while self._waiting and running < self.max_batch_size:
                req = self._waiting.popleft()
                self._live[req.request_id] = live = self._new_live(req)
                running += not self._parked(live)
                logger.debug("step %d: admitted request %s", self._step, req.request_id)

    def _new_live(self, req: GenerationRequest) -> _Live:
        models = set(req.recipe.model_names())
        k = 0
        if req.speculative is not None:
            models.add(req.speculative.draft_model)
            k = req.speculative.num_draft_tokens
        gen = make_generator(req.sampling)  # None (the global RNG) for an unseeded request
        prompts = {m: tuple(int(t) for t in req.model_prompts.get(m, req.prompt_ids)) for m in models}
        stops = req.stop_token_ids if req.stop_token_ids is not None else self._eos
        return _Live(
            request=req,
            models=tuple(sorted(models)),
            prompts=prompts,
            stop_ids=frozenset(stops),
            generator=gen,
            draft_k=k,
            held={m: 0 for m in models},
            valid={m: 0 for m in models},
        )

    # ------------------------------------------------------------------------------------------------ planning

    def _draft_k(self, live: _Live) -> int:
        """Tokens to draft this step: never past max_new_tokens (a verified draft emits up to k + 1 tokens)."""
        if live.request.speculative is None:
            return 0
        return max(0, min(live.draft_k, live.request.max_new_tokens - len(live.generated) - 1))

    def _add_extend(self, rnd: _Round, live: _Live, model: str, seq: Sequence[int], want: Want, rows: int) -> None:
        """Bring ``model``'s cache of ``live`` to ``seq`` with one extend (after a truncate if it holds stale
        tokens), keeping the logits of the last ``rows`` positions. At least ``rows`` tokens are always sent, so a
        model that is already further (after a failed step, say) re-sends its last tokens to give logits again."""
        start = min(live.valid[model], len(seq) - rows)
        if live.held[model] > start:
            rnd.truncates.setdefault(model, []).append((live.rid, start))
        tokens = tuple(seq[start:])
        routing = live.request.recipe.route
        feats = 0
        if routing is not None and live.route is None and model == routing.model and start == 0:
            feats = len(live.prompts[model])  # the routed request's prefill: its prompt representation comes along
            rnd.featured.setdefault(model, []).append(live)
        rnd.extends.setdefault(model, []).append(ExtendOp(live.rid, tokens, want, features_tokens=feats))
        rnd.owners.setdefault(model, []).append((live, start + len(tokens), rows))

    def _plan(self, drafts: Mapping[str, _Draft]) -> _Round:
        """The main round: every row's extends, speculative verifies, and the pending releases."""
        rnd = self._release_round()
        for live in self._ready():
            draft = drafts.get(live.rid)
            if draft is None:
                for m in live.request.recipe.model_names():
                    self._add_extend(rnd, live, m, live.history(m), "last", 1)
                continue
            d = live.request.speculative.draft_model  # type: ignore[union-attr]
            for m in live.request.recipe.model_names():
                seq = live.history(m) + tuple(draft.tokens)
                # the draft model already gave its logits before y_1..y_k while drafting: it only needs y_k's
                rows = 1 if m == d else draft.k + 1
                self._add_extend(rnd, live, m, seq, "all", rows)
        return rnd

    # ------------------------------------------------------------------------------------------------ execution

    def _execute(self, rnd: _Round) -> dict[tuple[str, str], torch.Tensor]:
        """Submit every plan, wait on the futures, record what each runner now holds.

        Returns (request id, model) -> the kept logits rows [rows, V] of every request that is not parked. A runner
        that does not answer within stall_timeout_s becomes pending and its requests are parked (see the module
        docstring); every other future has resolved when this returns. Raises StepFailed after that.
        """
        plans = rnd.plans()
        futures: dict[str, Future] = {m: self._submit(m, plan) for m, plan in plans.items()}
        started = time.monotonic()
        out: dict[tuple[str, str], torch.Tensor] = {}
        failure: StepFailed | None = None
        parked: list[_Live] = []
        # the routing model first: its prompts are routed while the larger models still compute
        for m in sorted(futures, key=lambda name: name not in rnd.featured):
            fut = futures[m]
            if self.stall_timeout_s is not None and not fut.done():  # in-process runners answer at submit
                wait([fut], timeout=max(0.0, started + self.stall_timeout_s - time.monotonic()))
                if not fut.done():
                    logger.warning("step %d: runner %s has not answered in %.1f s: its requests wait, the others go on",
                                   self._step, m, self.stall_timeout_s)
                    owners = rnd.owners.get(m, [])
                    self._pending[m] = _Pending(fut, plans[m], owners, rnd.featured.get(m, []), started)
                    parked.extend(live for live, _, _ in owners)
                    continue
            failure = self._collect(m, fut, plans[m], rnd.owners.get(m, ()), rnd.featured.get(m, ()), out) or failure
        if parked:
            self._forget_drafts(parked)
            out = {key: rows for key, rows in out.items() if not self._parked(self._live[key[0]])}
        if failure is not None:
            raise failure
        return out

    def _collect(
        self,
        m: str,
        fut: Future,
        plan: StepPlan,
        owners: Sequence[tuple[_Live, int, int]],
        featured: Sequence[_Live],
        out: dict[tuple[str, str], torch.Tensor],
    ) -> StepFailed | None:
        """Record one resolved runner future: what each owner's cache now holds, its kept rows into ``out``, the
        routes of featured prefills. Returns the failure (not raised, so every other future is still recorded)."""
        try:
            logits = fut.result()
        except BaseException as exc:  # noqa: BLE001 - reported as StepFailed
            logger.warning("step %d: runner %s failed: %s", self._step, m, exc)
            return StepFailed(m, exc)
        self._releases[m] -= set(plan.releases)
        for (live, held, rows), rows_out in zip(owners, logits):
            live.held[m] = live.valid[m] = held
            out[(live.rid, m)] = rows_out[-rows:]
        if not featured:
            return None
        try:
            feats = split_features(m, logits, len(plan.extends), len(featured))
        except Exception as exc:  # noqa: BLE001 - a runner without features: reported like any failure
            for live in featured:
                live.valid[m] = 0  # the retry prefills again and asks again
            return StepFailed(m, exc)
        self._set_routes(list(zip(featured, feats)))
        return None

    def _submit(self, model: str, plan: StepPlan) -> Future:
        """runner.submit, with an exception raised by submit itself turned into a failed future."""
        try:
            return self._runners[model].submit(plan)
        except Exception as exc:  # noqa: BLE001 - reported through the future like any runner failure
            return failed(exc)

    def _release_round(self) -> _Round:
        """A round carrying every pending release (a pending runner's wait for its answer)."""
        rnd = _Round()
        for model, ids in self._releases.items():
            if ids and model not in self._pending:
                rnd.releases[model] = sorted(ids)
        return rnd

    def _flush_releases(self) -> None:
        """Free finished requests' caches now, with release-only plans."""
        rnd = self._release_round()
        if rnd.releases:
            self._execute(rnd)

    # ------------------------------------------------------------------------------------------------ routing

    def _prepare_routes(self) -> None:
        """Make sure every routed request that still needs its weights has its example table (one runner call per
        new example set, on this step thread, so no other plan is in flight)."""
        for live in self._ready():
            routing = live.request.recipe.route
            if routing is not None and live.route is None:
                try:
                    self._route_tables.get(routing, self._runners[routing.model])
                except Exception as exc:  # noqa: BLE001 - a runner failure like any other
                    raise StepFailed(routing.model, exc) from exc

    def route_prompts(self, routing: Routing, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """[R, T] expert weights of R prompt representations under ``routing`` (the example table is computed
        through the routing model's runner on first use: call from the thread that drives step(), between steps)."""
        table = self._route_tables.get(routing, self._runners[routing.model])
        return route(torch.stack(list(features)), table, routing)[0]

    def _set_routes(self, prompt_features: Sequence[tuple[_Live, torch.Tensor]]) -> None:
        """The routing model's prefills came back: weight each request's experts by its prompt representation
        (rows that share a routing are routed at once)."""
        groups: dict = {}
        for live, f in prompt_features:
            groups.setdefault(live.request.recipe.route, []).append((live, f))
        for routing, rows in groups.items():
            table = self._route_tables.get(routing, self._runners[routing.model])
            weights, sims = route(torch.stack([f for _, f in rows]), table, routing)  # [R, T] each
            for (live, _), w, s in zip(rows, weights, sims):
                live.route = w  # [T]
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("request %s routed: similarities %s weights %s", live.rid, s.tolist(), w.tolist())

    # ------------------------------------------------------------------------------------------------ speculative

    def _draft(self) -> dict[str, _Draft]:
        """Draft rounds: the draft model of each speculative request proposes k tokens, one per round."""
        drafts = {live.rid: _Draft(k) for live in self._ready() if (k := self._draft_k(live)) > 0}
        if not drafts:
            return drafts
        for i in range(max(d.k for d in drafts.values())):
            rnd = _Round()
            rows = [self._live[rid] for rid, d in drafts.items() if d.k > i]
            for live in rows:
                d = live.request.speculative.draft_model  # type: ignore[union-attr]
                self._add_extend(rnd, live, d, live.history(d) + tuple(drafts[live.rid].tokens), "last", 1)
            logits = self._execute(rnd)
            if self._pending:  # the draft model stalled: its requests wait, with no draft
                for live in [live for live in rows if self._parked(live)]:
                    del drafts[live.rid]
                rows = [live for live in rows if live.rid in drafts]
                if not rows:
                    continue
            raw = torch.cat(
                [logits[(live.rid, live.request.speculative.draft_model)] for live in rows]  # type: ignore[union-attr]
            )  # [R, V]
            logprobs = torch.log_softmax(raw, dim=-1)  # [R, V]
            params = [live.request.sampling for live in rows]
            q = to_probs(logprobs, params)  # [R, V]
            ys = sample(logprobs, params, [live.generator for live in rows])  # [R]
            for r, live in enumerate(rows):
                dr = drafts[live.rid]
                dr.raw.append(raw[r])
                dr.q.append(q[r])
                dr.tokens.append(int(ys[r]))
        return drafts

    # ------------------------------------------------------------------------------------------------ fuse + update

    def _fused_rows(
        self, lives: Sequence[_Live], logits: Mapping[tuple[str, str], torch.Tensor], drafts: Mapping[str, _Draft]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Fuse every request's rows, batched per recipe: request id -> (log-probs [r, V], alphas [r, T], the DLF
        loss [r] or None for a static recipe)."""
        groups: dict[Recipe, list[_Live]] = {}
        for live in lives:
            groups.setdefault(live.request.recipe, []).append(live)
        fused: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        for recipe, lives in groups.items():
            per_model: dict[str, list[torch.Tensor]] = {m: [] for m in recipe.model_names()}
            sizes = []
            for live in lives:
                draft = drafts.get(live.rid)
                for m in per_model:
                    rows = logits[(live.rid, m)]  # [r, V]
                    if draft is not None and m == live.request.speculative.draft_model:  # type: ignore[union-attr]
                        rows = torch.cat([torch.stack(draft.raw), rows])  # [k + 1, V]
                    per_model[m].append(rows)
                sizes.append(per_model[next(iter(per_model))][-1].shape[0])
            inputs = {m: concat_rows(rows).to(self.fusion_device) for m, rows in per_model.items()}  # no-op on CPU
            weights = None
            if recipe.route is not None:  # each row routed on its own request's prompt: [rows, T]
                weights = torch.cat([live.route.expand(n, -1) for live, n in zip(lives, sizes)]).to(self.fusion_device)
            t0 = time.perf_counter()
            result = fuse(inputs, recipe, weights)  # add_request validated the recipe (trusted now); fuse checks logits
            self.fusion_time_s += time.perf_counter() - t0
            logprobs, alphas = result.logprobs.cpu(), result.alphas.cpu()  # sampling uses per-request CPU generators
            losses = result.loss.cpu().split(sizes) if result.loss is not None else [None] * len(lives)
            for live, lp, al, lo in zip(lives, logprobs.split(sizes), alphas.split(sizes), losses):
                fused[live.rid] = (lp, al, lo)
        return fused

    def _fuse_and_update(
        self, logits: Mapping[tuple[str, str], torch.Tensor], drafts: Mapping[str, _Draft]
    ) -> list[StepEvent]:
        """Fuse, pick the tokens (sample, or accept/reject a draft), append them and check the stops."""
        lives = self._ready()  # not those parked by this step's stalls
        if not lives:
            return []
        drafts = {rid: d for rid, d in drafts.items() if not self._parked(self._live[rid])}
        fused = self._fused_rows(lives, logits, drafts)
        picked = self._sample_plain(fused, [live for live in lives if live.rid not in drafts])
        for rid, draft in drafts.items():
            picked[rid] = self._accept(self._live[rid], draft, *fused[rid])
        return self._update(lives, picked)

    @staticmethod
    def _sample_plain(
        fused: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], plain: Sequence[_Live]
    ) -> dict[str, tuple[list[int], list[torch.Tensor], list[float | None]]]:
        """One token per plain request, all rows sampled at once (each with its own generator)."""
        if not plain:
            return {}
        lp = concat_rows([fused[live.rid][0] for live in plain])  # [B, V]
        params = [live.request.sampling for live in plain]  # validated at add_request; lp is fuse's checked output
        tokens = sample(lp, params, [live.generator for live in plain], check=False)  # [B]
        return {live.rid: ([int(tokens[b])], [fused[live.rid][1][0]], [_loss_at(fused[live.rid][2], 0)])
                for b, live in enumerate(plain)}

    @staticmethod
    def _accept(
        live: _Live, draft: _Draft, lp: torch.Tensor, alphas: torch.Tensor, loss: torch.Tensor | None
    ) -> tuple[list[int], list[torch.Tensor], list[float | None]]:
        """Accept a prefix of the draft against the fused targets (lp [k + 1, V], alphas [k + 1, T]) and roll
        every model back to it: the truncate rides the next plan. Returns the accepted tokens plus one."""
        spec = live.request.speculative
        params = live.request.sampling
        p = to_probs(lp, [params] * lp.shape[0], check=False)  # [k + 1, V] from fuse's checked output
        drafted = torch.tensor(draft.tokens, dtype=torch.long)  # [k]
        n_acc, nxt = speculative_accept(p, torch.stack(draft.q), drafted, params.greedy, live.generator)
        live.drafted += draft.k
        live.accepted += n_acc
        if spec is not None and spec.adaptive:
            live.draft_k = _adapt_k(live.draft_k, n_acc, spec)
        base = len(live.generated)
        for m in live.models:
            live.valid[m] = min(live.held[m], len(live.prompts[m]) + base + n_acc)
        kept = range(n_acc + 1)
        return draft.tokens[:n_acc] + [int(nxt)], [alphas[j] for j in kept], [_loss_at(loss, j) for j in kept]

    def _update(
        self, lives: Sequence[_Live], picked: Mapping[str, tuple[list[int], list[torch.Tensor], list[float | None]]]
    ) -> list[StepEvent]:
        """Append each request's tokens in order until one of them stops it."""
        events: list[StepEvent] = []
        for live in lives:
            tokens, alphas, losses = picked[live.rid]
            live.num_steps += 1
            for token, al, lo in zip(tokens, alphas, losses):
                events.append(self._append(live, token, al, lo))
                if live.finish_reason is not None:
                    self._finish(live)
                    break
        return events

    def _append(self, live: _Live, token: int, alphas: torch.Tensor, loss: float | None = None) -> StepEvent:
        """Add one token to a request, check its stops and return its event."""
        live.generated.append(token)
        weights = [float(a) for a in alphas]
        live.weights.append(weights)
        reason = FINISH_STOP if token in live.stop_ids else None
        delta = ""
        if self._decode is not None:
            if live.detok is None:
                live.detok = IncrementalText(self._decode)
            ids = live.generated[:-1] if reason == FINISH_STOP else live.generated
            last = reason is not None or len(live.generated) >= live.request.max_new_tokens
            live.decoded += live.detok.flush(ids) if last else live.detok.step(ids)
            text = live.decoded
            cut = _find_stop(text, live.request.stop_strings, len(live.text))
            if cut >= 0:
                if reason is None:  # a stop token takes precedence: then no stop string is reported
                    live.stop = next(s for s in live.request.stop_strings if text.startswith(s, cut))
                text, reason = text[:cut], FINISH_STOP
            elif reason is None and len(live.generated) < live.request.max_new_tokens:
                text = _held_back(text, live.request.stop_strings)
            keep = len(live.text) if text.startswith(live.text) else _common_prefix_len(live.text, text)
            if keep < len(live.text):
                logger.debug("request %s: decoded text changed before position %d", live.rid, len(live.text))
            delta = text[max(keep, len(live.text)) :]
            live.text += delta  # always what was streamed
        if reason is None and len(live.generated) >= live.request.max_new_tokens:
            reason = FINISH_LENGTH
        live.finish_reason = reason
        return StepEvent(live.rid, token, delta, tuple(weights), reason is not None, reason, self._step,
                         live.drafted, live.accepted, loss, live.result() if reason is not None else None)

    def _finish(self, live: _Live) -> None:
        """Take a finished request out of the batch; its caches are freed by the next plans."""
        self._live.pop(live.rid, None)
        for m in live.models:
            if live.held[m] > 0:
                self._releases[m].add(live.rid)
        with self._lock:
            self._ids.discard(live.rid)
        logger.debug("step %d: request %s finished (%s)", self._step, live.rid, live.finish_reason)

"""The Coordinator: one Decoder over the pipeline's runners, and the loop thread that drives it.

    coordinator = Coordinator(runners, codec=TextCodec.from_tokenizer(tok), limits=topology.limits)
    stream = coordinator.submit(request)             # Overloaded at once when max_concurrent_requests are running
    for chunk in stream: ...                         # or `async for` in an event loop; one StreamChunk per step
    coordinator.abort(request.request_id)            # client went away: its sequences are freed on every model
    future = coordinator.score(token_ids, recipe, top_n=5)   # fused log-prob of every token (echo / logprobs)

One loop thread owns the Decoder's step: while there is work it admits new requests (they join the running batch at
the next step), runs one batched step over every runner at once (RemoteRunners: one gRPC stream per worker, all
called concurrently; the token chosen at step n travels in the plan of step n + 1), and hands each request's tokens
to that request's own bounded stream. Submitting, aborting and consuming happen on any other thread (the Serve
replica's event loop); none of them waits for a step. A request's deadline (limits.request_timeout_s) is enforced
by the loop: the request is aborted and its stream ends with DeadlineExceeded.

Scoring (``score``) also runs on the loop thread, between two steps: every model of the recipe extends the whole
sequence with want="all" under a reserved sequence id, the sequence is released at once, and each position is fused
(DLF solved per position). An optional ``observer`` (logitfusion.metrics.ServiceMetrics) is told about steps, first
tokens and tokens; the coordinator works the same without one.

A runner that does not answer a step within serve.stall_timeout_s holds up only the requests that read its model
(the Decoder parks them until it answers; they end at their deadline if it never does); scoring jobs that read it
wait the same way, up to limits.request_timeout_s. A runner that fails a step is retried (RemoteRunner has already
reconnected to a restarted worker and replayed every sequence if it could); a runner that stays unavailable fails
only the requests that read its model.
No Ray and no protobuf here: the Serve deployment (cluster.serve_app) converts at the edge.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from logitfusion.engine.decoder import (
    FINISH_ABORT,
    FINISH_LENGTH,
    Decoder,
    DecoderOverloaded,
    GenerationRequest,
    GenerationResult,
    StepEvent,
    StepFailed,
)
from logitfusion.engine.routing import split_features
from logitfusion.engine.runner import ExtendOp, ModelRunner, RunnerError, RunnerInfo, RunnerUnavailable, StepPlan
from logitfusion.engine.scoring import score_tokens
from logitfusion.errors import (
    Cancelled,
    DeadlineExceeded,
    FusionError,
    InternalError,
    InvalidRequest,
    ModelUnavailable,
    Overloaded,
    classify,
)
from logitfusion.fusion import fuse
from logitfusion.limits import Limits

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 1.0  # longest sleep of an idle loop between deadline checks (it also wakes on every submit/abort)
SCORE_SEQ_PREFIX = "~score/"  # sequence ids of scoring jobs; refused as a request id


# ------------------------------------------------------------------------------------------------ logits guard


class NonFiniteLogits(RunnerError):
    """A model answered NaN or +inf logits (a broken checkpoint, an overflow): the server's fault, never the
    request's. The requests that read the model fail with INTERNAL naming it; the others go on."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(message)
        self.model = model


def check_finite_logits(model: str, logits: Sequence[torch.Tensor]) -> None:
    """Raise NonFiniteLogits when a row holds NaN or +inf (-inf is a masked token). One reduction per tensor: a
    sum is finite exactly when no element is NaN or +-inf; only then is the exact check needed."""
    for i, t in enumerate(logits):
        if t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float64))):
            nan, posinf = int(torch.isnan(t).sum()), int(torch.isposinf(t).sum())
            if nan or posinf:
                raise NonFiniteLogits(model, f"model {model!r} returned non-finite logits ({nan} NaN, {posinf} +inf "
                                             f"in result {i} of shape {list(t.shape)})")


class _CheckedRunner:
    """A runner whose step results pass check_finite_logits (everything else is delegated unchanged)."""

    def __init__(self, name: str, runner: ModelRunner) -> None:
        self._name, self._runner = name, runner

    def submit(self, plan: Any) -> Future:
        checked: Future = Future()

        def done(f: Future) -> None:
            try:
                logits = f.result()
                check_finite_logits(self._name, logits)
            except BaseException as exc:  # noqa: BLE001 - handed on through the future
                checked.set_exception(exc)
            else:
                checked.set_result(logits)

        self._runner.submit(plan).add_done_callback(done)
        return checked

    def __getattr__(self, item: str) -> Any:
        return getattr(self._runner, item)


# ------------------------------------------------------------------------------------------------ public types


@dataclass(frozen=True)
class TextCodec:
    """The shared tokenizer as the coordinator needs it."""

    encode: Callable[[str], list[int]]  # text -> prompt ids (with BOS if the tokenizer adds one)
    decode: Callable[[Sequence[int]], str]  # completion ids -> text (special tokens skipped)
    eos_token_ids: tuple[int, ...] = ()  # default stop tokens

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TextCodec:
        """A transformers tokenizer -> codec (encode with the tokenizer's own special tokens, decode without)."""
        eos = getattr(tokenizer, "eos_token_id", None)
        return cls(
            encode=lambda text: list(tokenizer.encode(text)),
            decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
            eos_token_ids=() if eos is None else (int(eos),),
        )


@dataclass(frozen=True)
class TokenOut:
    """One generated token."""

    token_id: int
    text: str  # the text it adds to the completion
    index: int  # position in the completion, from 0


@dataclass(frozen=True)
class FinishInfo:
    """How a request ended."""

    reason: str  # "length" | "eos" | "stop"
    text: str  # the whole completion text (stop string excluded)
    stop: str  # the stop string that ended it ("" otherwise)
    prompt_tokens: int
    completion_tokens: int
    steps: int  # decoding steps (fewer than completion_tokens when speculative drafts were accepted)
    drafted_tokens: int = 0  # speculative decoding: tokens the draft model proposed
    accepted_tokens: int = 0  # of those, the ones the fused distribution accepted


@dataclass(frozen=True)
class StreamChunk:
    """One generated token of a request, the expert weights that produced it, and the end if it ended.

    A speculative step emits several tokens: each gets its own chunk (the weights are solved per position), and
    they share the step number.
    """

    request_id: str
    step: int  # request-local decoding step, from 0
    tokens: tuple[TokenOut, ...]
    weights: tuple[tuple[str, float], ...]  # (expert, alpha) in recipe order
    finished: FinishInfo | None = None
    loss: float | None = None  # the DLF objective at those weights (None for static recipes)


# ------------------------------------------------------------------------------------------------ per-request stream


class RequestStream:
    """The chunks of one request, in order. Thread-safe; iterate it (blocking) or ``async for`` it (event loop).

    Bounded by construction: a request produces at most max_new_tokens chunks plus one end, and the capacity is that.
    Iteration raises the request's FusionError if it failed (deadline, model unavailable, shutdown).
    """

    def __init__(self, request_id: str, capacity: int) -> None:
        self.request_id = request_id
        self.capacity = capacity
        self._items: deque[StreamChunk | FusionError] = deque()
        self._cond = threading.Condition()
        self._ended = False  # the last item has been pushed
        self._consumed_end = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def ended(self) -> bool:
        """True once the request finished or failed (its last item is queued)."""
        with self._cond:
            return self._ended

    def _push(self, item: StreamChunk | FusionError) -> None:
        with self._cond:
            if self._ended:
                return
            if len(self._items) >= self.capacity:  # cannot happen with the capacity the coordinator picks
                item = InternalError(f"request {self.request_id}: stream capacity {self.capacity} exceeded")
            self._items.append(item)
            self._ended = isinstance(item, FusionError) or item.finished is not None
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: nobody is waiting there any more
                pass

    def _pop(self) -> StreamChunk | FusionError | None:
        """Next item, or None if none is queued yet. Raises StopIteration after the end."""
        if self._items:
            item = self._items.popleft()
            if isinstance(item, FusionError) or item.finished is not None:
                self._consumed_end = True
            return item
        if self._consumed_end:
            raise StopIteration
        return None

    def get(self, timeout_s: float | None = None) -> StreamChunk:
        """The next chunk (blocking). Raises the request's FusionError, StopIteration after the end, TimeoutError."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._consumed_end, timeout=timeout_s):
                raise TimeoutError(f"request {self.request_id}: no chunk within {timeout_s} s")
            item = self._pop()
        if isinstance(item, FusionError):
            raise item
        return item  # type: ignore[return-value]

    def __iter__(self) -> Iterator[StreamChunk]:
        while True:
            try:
                yield self.get()
            except StopIteration:
                return

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._waiters.append((loop, event))
        try:
            while True:
                event.clear()
                with self._cond:
                    try:
                        item = self._pop()
                    except StopIteration:
                        return
                if item is None:
                    await event.wait()
                    continue
                if isinstance(item, FusionError):
                    raise item
                yield item
        finally:
            with self._cond:
                self._waiters.remove((loop, event))


# ------------------------------------------------------------------------------------------------ the coordinator


@dataclass
class _Entry:
    """The coordinator's book-keeping for one request."""

    request: GenerationRequest
    stream: RequestStream
    models: frozenset[str]
    deadline: float  # time.monotonic() after which the request is aborted
    timeout_s: float  # the time it was given (for the message)
    steps: int = 0  # decoding steps that gave it tokens
    num_tokens: int = 0  # tokens streamed so far (the Decoder keeps the tokens and the text)
    error: FusionError | None = None  # set when the coordinator aborts it on purpose
    submitted_at: float = field(default_factory=time.monotonic)  # for the time to first token


@dataclass
class _ScoreJob:
    """One sequence to score under a recipe (see ``Coordinator.score``)."""

    seq_id: str
    token_ids: tuple[int, ...]
    recipe: Any  # fusion.Recipe
    top_n: int
    future: concurrent.futures.Future
    deadline: float  # time.monotonic() after which a job still waiting on a stalled model fails


class Coordinator:
    """A Decoder over ``runners`` (model name -> ModelRunner), stepped by one loop thread. See the module docstring.

    codec: the shared tokenizer (encode prompts, decode completions, EOS). limits: admission and per-request limits.
    max_step_retries: consecutive failed steps of one runner tolerated before its requests fail.
    """

    def __init__(
        self,
        runners: Mapping[str, ModelRunner],
        *,
        codec: TextCodec,
        limits: Limits,
        max_step_retries: int = 3,
        name: str = "coordinator",
        fusion_device: str = "auto",
        stall_timeout_s: float | None = 2.0,
    ) -> None:
        if max_step_retries < 0:
            raise ValueError(f"max_step_retries={max_step_retries} must be >= 0")
        self.name = name
        self.limits = limits
        self.codec = codec
        self.runners = dict(runners)
        checked = {name: _CheckedRunner(name, r) for name, r in self.runners.items()}
        # The Decoder checks the vocabularies (ValueError naming both models) before anything is admitted.
        self.decoder = Decoder(
            checked,  # type: ignore[arg-type]  # ModelRunner's contract, NaN/+inf results refused by model name
            eos_token_ids=codec.eos_token_ids,
            decode_fn=codec.decode,
            max_batch_size=limits.max_batch_size,
            max_new_tokens_limit=limits.max_new_tokens,
            max_waiting_requests=limits.max_concurrent_requests,
            fusion_device=fusion_device,
            stall_timeout_s=stall_timeout_s,  # a stalled runner holds up only the requests that read it
        )
        self.max_step_retries = max_step_retries
        self._cv = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._aborts: dict[str, FusionError | None] = {}  # request id -> why (None: the client went away)
        self._failures: dict[str, int] = {}  # model -> consecutive failed steps
        self._closed = False
        self._ids = itertools.count(1)
        self._score_ids = itertools.count(1)
        self._score_jobs: list[_ScoreJob] = []
        self.observer: Any = None  # e.g. metrics.ServiceMetrics: on_step, on_first_token, on_token
        self.steps_run = 0
        self._thread = threading.Thread(target=self._run, name=f"{name}-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------- queries

    def models(self) -> dict[str, RunnerInfo]:
        return {name: r.describe() for name, r in self.runners.items()}

    def alive(self) -> bool:
        """True while the loop thread runs and the coordinator is not closed."""
        return self._thread.is_alive() and not self._closed

    def active_requests(self) -> list[str]:
        with self._cv:
            return sorted(self._entries)

    def sequences(self) -> dict[str, dict[str, int]]:
        """model -> that runner's live sequences (seq id -> cached tokens); all empty when nothing leaks."""
        return {name: r.sequences() for name, r in self.runners.items()}

    def new_request_id(self) -> str:
        return f"{self.name}-{next(self._ids)}"

    # ------------------------------------------------------------------------------------------- requests

    def submit(self, request: GenerationRequest, *, timeout_s: float | None = None) -> RequestStream:
        """Admit a request; it joins the running batch at the next step. Raises Overloaded at once when
        max_concurrent_requests requests are running or waiting, InvalidRequest (or the Decoder's ValueError, which
        names the field and the limit) for a bad request, ModelUnavailable after close()."""
        timeout = self.limits.request_timeout_s if timeout_s is None else min(timeout_s, self.limits.request_timeout_s)
        rid = request.request_id
        if rid.startswith(SCORE_SEQ_PREFIX):
            raise InvalidRequest(f"request_id: the prefix {SCORE_SEQ_PREFIX!r} is reserved", field="request_id")
        with self._cv:
            if self._closed:
                raise ModelUnavailable("the pipeline is shutting down")
            if len(self._entries) >= self.limits.max_concurrent_requests:
                raise Overloaded(
                    f"{len(self._entries)} requests are running, the limit max_concurrent_requests is "
                    f"{self.limits.max_concurrent_requests}; retry later"
                )
            if rid in self._entries:
                raise InvalidRequest(f"request_id: {rid!r} is already in use by a running request", field="request_id")
            stream = RequestStream(rid, capacity=request.max_new_tokens + 2)
            models = frozenset(request.recipe.model_names()) | (
                {request.speculative.draft_model} if request.speculative else frozenset()
            )
            self._entries[rid] = _Entry(request, stream, frozenset(models), time.monotonic() + timeout, timeout)
        try:
            self.decoder.add_request(request)
        except DecoderOverloaded as exc:
            self._drop(rid)
            raise Overloaded(str(exc)) from None
        except BaseException:
            self._drop(rid)
            raise
        with self._cv:
            self._cv.notify_all()
        logger.debug("request %s admitted (%d running)", rid, len(self._entries))
        return stream

    def score(self, token_ids: Sequence[int], recipe: Any, *, top_n: int = 1) -> concurrent.futures.Future:
        """Score ``token_ids`` under ``recipe``'s fused distribution; the future resolves to SequenceScores (or
        fails with ModelUnavailable when a model fails). Raises Overloaded at once when max_concurrent_requests
        requests and scoring jobs are pending, ModelUnavailable after close()."""
        if len(token_ids) < 1:
            raise InvalidRequest("prompt: nothing to score (no tokens)", field="prompt")
        longest = min(self.decoder._info[m].max_length_tokens for m in recipe.model_names())
        if len(token_ids) > longest:
            raise InvalidRequest(
                f"prompt: {len(token_ids)} tokens to score exceed the models' max length ({longest} tokens)",
                field="prompt",
            )
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise ModelUnavailable("the pipeline is shutting down")
            busy = len(self._entries) + len(self._score_jobs)
            if busy >= self.limits.max_concurrent_requests:
                raise Overloaded(
                    f"{busy} requests are running, the limit max_concurrent_requests is "
                    f"{self.limits.max_concurrent_requests}; retry later"
                )
            seq = f"{SCORE_SEQ_PREFIX}{self.name}/{next(self._score_ids)}"
            deadline = time.monotonic() + self.limits.request_timeout_s
            self._score_jobs.append(_ScoreJob(seq, tuple(int(t) for t in token_ids), recipe, top_n, fut, deadline))
            self._cv.notify_all()
        return fut

    def abort(self, request_id: str, error: FusionError | None = None) -> bool:
        """Stop a request and free its sequences on every runner (done by the loop thread, never blocking the
        caller). ``error`` ends its stream with that error; None (client went away) just ends it."""
        with self._cv:
            entry = self._entries.get(request_id)
            if entry is None or entry.stream.ended:
                return False
            self._aborts[request_id] = error
            self._cv.notify_all()
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no request is running (each finished, failed or aborted and retired); False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._entries, timeout=max(0.0, timeout_s))

    def abort_all(self, error: FusionError) -> list[str]:
        """Abort every running request with ``error`` (e.g. a drain ran out of time); returns their ids."""
        with self._cv:
            doomed = [rid for rid, e in self._entries.items() if not e.stream.ended]
        return [rid for rid in doomed if self.abort(rid, error)]

    def close(self, timeout_s: float = 30.0) -> None:
        """Fail every request (ModelUnavailable), free their sequences, stop the loop. Runners stay open."""
        with self._cv:
            if self._closed:
                return
            for rid in self._entries:
                self._aborts.setdefault(rid, ModelUnavailable("the pipeline is shutting down"))
            jobs, self._score_jobs = self._score_jobs, []
            self._cv.notify_all()
        for job in jobs:
            job.future.set_exception(ModelUnavailable("the pipeline is shutting down"))
        deadline = time.monotonic() + timeout_s
        with self._cv:  # let the loop retire the aborts (frees the sequences) before it stops
            self._cv.wait_for(lambda: not self._entries, timeout=max(0.0, deadline - time.monotonic()))
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))

    # ------------------------------------------------------------------------------------------- the loop

    def _drop(self, rid: str) -> None:
        with self._cv:
            self._entries.pop(rid, None)
            self._cv.notify_all()

    def _wait_for_work(self) -> bool:
        """Sleep until there is something to do; False when the coordinator is closed."""
        with self._cv:
            while not self._closed and not self._aborts and not self._score_jobs and not self.decoder.has_work():
                self._expire_locked()
                if self._aborts:
                    break
                self._cv.wait(timeout=_IDLE_WAIT_S)
            return not self._closed

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for rid, e in self._entries.items():
            if now >= e.deadline and rid not in self._aborts and not e.stream.ended:
                self._aborts[rid] = DeadlineExceeded(
                    f"request {rid} ran longer than its timeout of {e.timeout_s:g} s "
                    f"(limits.request_timeout_s is {self.limits.request_timeout_s:g} s)"
                )

    def _run(self) -> None:
        logger.info("%s: loop started over models %s", self.name, sorted(self.runners))
        while self._wait_for_work():
            try:
                self._run_scores()
                self._retire_aborts()
                t0, fused0 = time.perf_counter(), getattr(self.decoder, "fusion_time_s", 0.0)
                events = self.decoder.step()
                if events and self.observer is not None:
                    fused_s = getattr(self.decoder, "fusion_time_s", 0.0) - fused0
                    self.observer.on_step(time.perf_counter() - t0, fused_s)
            except StepFailed as exc:
                self._on_step_failed(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the loop: fail what is running
                logger.exception("%s: step failed unexpectedly", self.name)
                self._fail_models(set(self.runners), classify(exc))
                continue
            self.steps_run += 1
            self._failures.clear()
            self._dispatch(events)
        logger.info("%s: loop stopped", self.name)

    def _run_scores(self) -> None:
        """Run the pending scoring jobs: one all-positions extend per model, then one release per model, then fuse
        each job's rows. A failing model fails the jobs that read it; releases are sent wherever extends were."""
        with self._cv:
            jobs, self._score_jobs = self._score_jobs, []
        jobs = self._defer_stalled_scores(jobs)
        if not jobs:
            return
        ops: dict[str, list[tuple[_ScoreJob, ExtendOp]]] = {}
        for job in jobs:
            route = job.recipe.route  # a routed recipe is routed on the scored sequence itself
            for m in job.recipe.model_names():
                feats = len(job.token_ids) if route is not None and m == route.model else 0
                ops.setdefault(m, []).append((job, ExtendOp(job.seq_id, job.token_ids, "all", features_tokens=feats)))
        logits: dict[tuple[str, str], torch.Tensor] = {}
        features: dict[str, torch.Tensor] = {}  # seq_id -> the routing model's representation of the sequence
        failed: dict[str, BaseException] = {}
        futures = {m: self._submit_plan(m, StepPlan(extends=tuple(op for _, op in pairs))) for m, pairs in ops.items()}
        for m, fut in futures.items():
            try:
                out = fut.result()
                for (job, _), rows in zip(ops[m], out):
                    logits[(job.seq_id, m)] = rows  # [n, V]
                featured = [job for job, op in ops[m] if op.features_tokens]
                if featured:
                    feats = split_features(m, out, len(ops[m]), len(featured))
                    features.update({job.seq_id: f for job, f in zip(featured, feats)})
            except BaseException as exc:  # noqa: BLE001 - fails the jobs of that model below
                logger.warning("%s: scoring on %s failed: %s", self.name, m, exc)
                failed[m] = exc
        releases = {m: self._submit_plan(m, StepPlan(releases=tuple(op.seq_id for _, op in pairs)))
                    for m, pairs in ops.items()}
        for m, fut in releases.items():
            try:
                fut.result()
            except BaseException as exc:  # noqa: BLE001 - a dead worker holds nothing
                logger.warning("%s: releasing scored sequences on %s failed: %s", self.name, m, exc)
        for job in jobs:
            bad = [m for m in job.recipe.model_names() if m in failed]
            if bad:
                job.future.set_exception(classify(failed[bad[0]]))
                continue
            try:
                with torch.inference_mode():
                    dev = self.decoder.fusion_device  # where decoding fuses (a GPU when the replica has one)
                    weights = None
                    if job.recipe.route is not None:
                        w = self.decoder.route_prompts(job.recipe.route, [features[job.seq_id]])  # [1, T]
                        weights = w.expand(len(job.token_ids), -1).to(dev)
                    inputs = {m: logits[(job.seq_id, m)].to(dev) for m in job.recipe.model_names()}
                    result = fuse(inputs, job.recipe, route_weights=weights)
                    scores = score_tokens(result.logprobs.cpu(), job.token_ids, job.top_n, result.alphas.cpu())
                    job.future.set_result(scores)
            except BaseException as exc:  # noqa: BLE001 - reported to the caller
                job.future.set_exception(classify(exc))

    def _defer_stalled_scores(self, jobs: list[_ScoreJob]) -> list[_ScoreJob]:
        """The jobs that can run now. Those reading a model whose runner is stalled (the Decoder's pending models)
        wait for it, back in the queue, or fail with DeadlineExceeded once limits.request_timeout_s has passed."""
        stalled = self.decoder.pending_models()
        if not stalled:
            return jobs
        now, ready, later = time.monotonic(), [], []
        for job in jobs:
            waits_on = sorted(stalled.intersection(job.recipe.model_names()))
            if not waits_on:
                ready.append(job)
            elif now >= job.deadline:
                job.future.set_exception(DeadlineExceeded(
                    f"scoring waited longer than limits.request_timeout_s ({self.limits.request_timeout_s:g} s) "
                    f"for model {waits_on[0]!r}, which does not answer"))
            else:
                later.append(job)
        with self._cv:
            self._score_jobs[:0] = later
        return ready

    def _submit_plan(self, model: str, plan: StepPlan) -> concurrent.futures.Future:
        try:
            return self.runners[model].submit(plan)
        except Exception as exc:  # noqa: BLE001 - reported through the future
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_exception(exc)
            return fut

    def _retire_aborts(self) -> None:
        with self._cv:
            self._expire_locked()
            aborts, self._aborts = self._aborts, {}
        for rid, error in aborts.items():
            with self._cv:
                entry = self._entries.get(rid)
                if entry is None:
                    continue
                entry.error = error
            if error is not None:
                entry.stream._push(error)  # the client learns at once; the Decoder's final event is swallowed
            logger.info("request %s aborted: %s", rid, error or "client went away")
            try:
                known = self.decoder.abort(rid)  # frees its sequences now (no step is running: we are the loop)
            except StepFailed as exc:  # the request is retired; its release on that runner is retried next step
                logger.warning("%s: releasing %s on %s failed: %s", self.name, rid, exc.model, exc.cause)
                known = True
            if not known:
                self._drop(rid)  # already finished inside the Decoder: nothing left to free

    def _on_step_failed(self, exc: StepFailed) -> None:
        """Retry the step (its requests stay live), or fail the requests of a runner that stays down."""
        if isinstance(exc.cause, NonFiniteLogits):  # deterministic: a retry would answer the same
            logger.error("%s: %s", self.name, exc.cause)
            self._fail_models({exc.model}, InternalError(f"{exc.cause}; the requests that read it were ended"))
            return
        n = self._failures.get(exc.model, 0) + 1
        self._failures[exc.model] = n
        if isinstance(exc.cause, RunnerUnavailable) or n > self.max_step_retries:
            logger.error("%s: model %s failed %d step(s): %s", self.name, exc.model, n, exc.cause)
            self._failures.pop(exc.model, None)
            self._fail_models({exc.model}, ModelUnavailable(f"model {exc.model!r} is unavailable: {exc.cause}"))
        else:
            logger.warning("%s: model %s failed a step (%d/%d), retrying: %s", self.name, exc.model, n,
                           self.max_step_retries, exc.cause)

    def _fail_models(self, models: set[str], error: FusionError) -> None:
        """Abort every request that reads one of ``models`` with ``error``."""
        with self._cv:
            doomed = [rid for rid, e in self._entries.items() if e.models & models and not e.stream.ended]
            for rid in doomed:
                self._aborts[rid] = error
        self._retire_aborts()
        if isinstance(error, ModelUnavailable):
            for m in models:  # forget what the dead runner held: its releases would stall every later step
                self.decoder.resync(m)

    def _dispatch(self, events: Sequence[StepEvent]) -> None:
        """Group the step's events per request into one chunk each and hand them out."""
        by_request: dict[str, list[StepEvent]] = {}
        for ev in events:
            by_request.setdefault(ev.request_id, []).append(ev)
        for rid, evs in by_request.items():
            with self._cv:
                entry = self._entries.get(rid)
            if entry is None:
                continue
            chunks = self._chunks(entry, evs)
            if entry.error is None:
                for chunk in chunks:
                    entry.stream._push(chunk)
            if evs[-1].finished:
                # aborted because the client went away: end the stream for anyone still holding it
                entry.stream._push(Cancelled(f"request {rid} was cancelled"))
                self._drop(rid)

    def _chunks(self, entry: _Entry, evs: Sequence[StepEvent]) -> list[StreamChunk]:
        """One request's events of one step -> one chunk per token (none for a bare abort event)."""
        chunks = []
        experts = entry.request.recipe.experts
        for ev in evs:
            if ev.token_id is None:
                continue
            if self.observer is not None:
                if not entry.num_tokens:
                    self.observer.on_first_token(entry.request.recipe.name, time.monotonic() - entry.submitted_at)
                self.observer.on_token(entry.request.recipe.name, experts, ev.alphas)
            token = TokenOut(ev.token_id, ev.text_delta, entry.num_tokens)
            entry.num_tokens += 1
            finished = self._finish_info(entry, ev.result) if ev.result is not None else None
            chunks.append(StreamChunk(entry.request.request_id, entry.steps, (token,), tuple(zip(experts, ev.alphas)),
                                      finished, ev.loss))
        if chunks:
            entry.steps += 1
        return chunks

    def _finish_info(self, entry: _Entry, result: GenerationResult) -> FinishInfo | None:
        """The Decoder's result of a finished request -> ours: "length", "eos" (a stop token) or "stop" (a stop
        string, named)."""
        if result.finish_reason == FINISH_ABORT:
            return None
        if result.finish_reason == FINISH_LENGTH:
            kind = "length"
        else:
            kind = "stop" if result.stop else "eos"
        return FinishInfo(kind, result.text, result.stop, len(entry.request.prompt_ids), len(result.token_ids),
                          entry.steps + 1, result.num_drafted_tokens, result.num_accepted_tokens)

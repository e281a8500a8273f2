"""What every request must respect: the ``limits:`` section of a topology, as one typed model.

It lives below ``actors/`` and ``cluster/`` because both read it: the Coordinator admits requests and bounds their
batches and deadlines with it, the frontends check every request field against it, and the topology
(``cluster.topology.Topology.limits``) is where a deployment sets it. ``StrictModel`` is the base of every model of
that config tree.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo in a YAML key must not be silently ignored); NaN and inf are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True)


class Limits(StrictModel):
    """What every request must respect. A request over a limit is refused with a message naming it."""

    max_concurrent_requests: int = Field(16, ge=1, le=4096, description="requests running or queued; more: refused")
    max_batch_size: int = Field(16, ge=1, le=1024, description="sequences decoded together in one step")
    max_new_tokens: int = Field(256, ge=1, le=1 << 20, description="upper bound of a request's max_new_tokens")
    default_max_new_tokens: int = Field(64, ge=1, le=1 << 20, description="max_new_tokens when a request has none")
    max_prompt_tokens: int = Field(1024, ge=1, le=1 << 20, description="longest prompt in tokens")
    max_message_bytes: int = Field(1 << 20, ge=1024, le=1 << 30, description="largest request message in bytes")
    request_timeout_s: float = Field(300.0, gt=0, le=86400, description="a request running longer is ended")
    max_stop_strings: int = Field(8, ge=0, le=256, description="most stop strings per request")
    max_stop_string_chars: int = Field(64, ge=1, le=4096, description="longest stop string in characters")
    max_request_id_chars: int = Field(128, ge=1, le=1024, description="longest client-chosen request id")
    max_draft_tokens: int = Field(8, ge=1, le=64, description="most tokens a speculative draft may propose per step")

    @model_validator(mode="after")
    def _cross(self) -> Limits:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds max_new_tokens "
                f"({self.max_new_tokens}): lower limits.default_max_new_tokens"
            )
        if self.max_batch_size > self.max_concurrent_requests:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) exceeds max_concurrent_requests "
                f"({self.max_concurrent_requests}): a batch never holds more than the running requests; "
                "lower limits.max_batch_size"
            )
        return self

"""`logitfusion demo` (what `make demo` runs): real requests to a real service on the zoo, fused answers printed.

By default it goes the whole way: an embedded local Ray on loopback, Ray Serve's gRPC ingress, the coordinator and
one worker actor per zoo model; then, for one held-out question per task, it asks the large base alone, the task's
small expert alone, and the DLF fusion of the two (streamed token by token, with the expert weight solved at every
step), and finally the multi-expert fusion with no task label: DLF over all four experts (`dlf_multi`), and the
deployment's default preset `routed_multi`, which routes the question to an expert by its prompt first. `--local`
runs the same questions through the in-process Decoder instead (no Ray, no gRPC).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from logitfusion.client import FusionClient
from logitfusion.cluster.cli import free_port, run_service
from logitfusion.cluster.shutdown import ShutdownRequested, SignalGuard
from logitfusion.engine.decoder import Decoder, GenerationRequest
from logitfusion.eval.run import load_zoo_runners, zoo_route_examples
from logitfusion.fusion import presets
from logitfusion.models.zoo import tasks as zt
from logitfusion.models.zoo.build import load_zoo

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "zoo.yaml"


def _questions() -> list[tuple[str, str, str]]:
    """(task, prompt, reference): the first held-out question of every task with an expert."""
    return [(t, zt.eval_items(t, limit=1)[0].prompt, zt.eval_items(t, limit=1)[0].reference) for t in zt.expert_tasks()]


def _mark(text: str, reference: str) -> str:
    return "right" if zt.score(text, reference) else "wrong"


def _weights(steps: list[dict[str, float]]) -> str:
    return "  ".join("[" + " ".join(f"{k.removeprefix('expert_')}={v:.2f}" for k, v in w.items()) + "]" for w in steps)


def run_service_demo(config: Path) -> int:
    """The service demo. Ctrl-C (or SIGTERM) at any point drains and stops the service, leaves no process behind and
    exits 0; a second one exits at once (cluster.shutdown)."""
    guard = SignalGuard().install()
    print(f"starting the service: embedded Ray on 127.0.0.1, Serve gRPC ingress, one worker per model ({config})",
          flush=True)
    try:
        service = run_service(config, grpc_port=free_port(), http_port=free_port(), blocking=False, access_log=False,
                              guard=guard)
    except (KeyboardInterrupt, ShutdownRequested) as exc:  # run_service stopped what it had started
        print(f"\ninterrupted ({exc or 'Ctrl-C'}) while starting: stopped", flush=True)
        return 0
    print(f"serving on {service.address} (started in {service.startup_s:.1f} s)\n", flush=True)
    reason = "done"
    try:
        _ask(service.address)
    except (KeyboardInterrupt, ShutdownRequested) as exc:
        reason = str(exc) or "interrupted"
        print(f"\ninterrupted ({reason}): draining and stopping the service; a second Ctrl-C exits at once", flush=True)
    finally:
        service.stop(reason)
    if reason != "done":
        print("stopped", flush=True)
    return 0


def _ask(address: str) -> None:
    """The demo's questions to the service at ``address``."""
    with FusionClient(address, timeout_s=120) as client:
        models = client.describe().get("models", [])
        print("models: " + ", ".join(m.get("name", "?") for m in models) + "\n")
        for task, prompt, ref in _questions():
            print(f"[{task}] {prompt}   (reference: {ref})")
            for preset in ("large_base", f"expert_{task}"):
                out = client.generate(prompt, preset=preset, max_new_tokens=8).text
                print(f"  {preset:<16} -> {out.strip()!r:<24} {_mark(out, ref)}")
            t0 = time.perf_counter()
            text, steps = "", []
            sys.stdout.write(f"  {'dlf_' + task:<16} -> ")
            for tok in client.generate_stream(prompt, preset=f"dlf_{task}", max_new_tokens=8):
                sys.stdout.write(tok.text)
                sys.stdout.flush()
                text += tok.text
                steps.append(tok.weights)
            dt = time.perf_counter() - t0
            print(f"   {_mark(text, ref)}  ({len(steps)} tokens, {1000 * dt / max(1, len(steps)):.0f} ms/token)")
            print(f"  {'':<16}    weights per step: {_weights(steps)}")
            multi = client.generate(prompt, preset="dlf_multi", max_new_tokens=8)
            print(f"  {'dlf_multi':<16} -> {multi.text.strip()!r:<24} {_mark(multi.text, ref)}   (no task label)")
            routed = client.generate(prompt, max_new_tokens=8)  # no preset: the default, routed_multi
            print(f"  {routed.recipe:<16} -> {routed.text.strip()!r:<24} {_mark(routed.text, ref)}   "
                  f"(no task label; first step {_weights(routed.weights[:1])})\n")


def run_local_demo() -> int:
    zoo = load_zoo()
    names = ["large", "small", *(f"expert_{t}" for t in zt.expert_tasks())]
    runners = load_zoo_runners(zoo, names)
    tok = runners["large"].tokenizer
    dec = Decoder(runners, eos_token_ids=[tok.eos_token_id], decode_fn=lambda ids: tok.decode(list(ids), skip_special_tokens=True))
    experts = [f"expert_{t}" for t in zt.expert_tasks()]
    examples = zoo_route_examples(zoo.model("small"), zt.expert_tasks())
    for task, prompt, ref in _questions():
        ids = tok(prompt)["input_ids"]
        recipes = {
            "large_base": presets.single("large"),
            f"expert_{task}": presets.single(f"expert_{task}"),
            f"dlf_{task}": presets.dlf("large", "small", [f"expert_{task}"], "newton"),
            "dlf_multi": presets.dlf("large", "small", experts, "joint"),
            "routed_multi": presets.routed("large", "small", experts, examples),
        }
        reqs = [GenerationRequest(n, ids, r, max_new_tokens=8, stop_strings=("\n",)) for n, r in recipes.items()]
        print(f"[{task}] {prompt}   (reference: {ref})")
        for res in dec.generate(reqs):
            print(f"  {res.request_id:<16} -> {res.text.strip()!r:<24} {_mark(res.text, ref)}")
            if res.experts and res.request_id.startswith(("dlf", "routed")):
                steps = [dict(zip(res.experts, w, strict=True)) for w in res.weights]
                print(f"  {'':<16}    weights per step: {_weights(steps)}")
        print()
    return 0


def demo_main(args: argparse.Namespace) -> int:
    if args.local:
        return run_local_demo()
    return run_service_demo(Path(args.config) if args.config else DEFAULT_CONFIG)

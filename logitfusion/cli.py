"""`logitfusion`: one command, with subcommands. Each subcommand imports its module lazily so `--help` is instant."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from logitfusion.fusion.methods import INNER_METHODS, SOLVERS  # the recipe table; imports no torch


def _threads() -> None:
    # One torch thread per process: on 2 cores, 2 threads under load ran 7x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _cmd_zoo_build(a: argparse.Namespace) -> int:
    from logitfusion.models.zoo.cli import build_main

    return build_main(a) or 0


def _cmd_zoo_merge(a: argparse.Namespace) -> int:
    from logitfusion.models.zoo.cli import merge_main

    return merge_main(a) or 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from logitfusion.eval.run import eval_main

    return eval_main(a) or 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from logitfusion.demo import demo_main

    return demo_main(a) or 0


def _cmd_serve(a: argparse.Namespace) -> int:
    from logitfusion.cluster.cli import serve_main

    return serve_main(a) or 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from logitfusion.cluster.cli import generate_main

    return generate_main(a) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="logitfusion", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="the tiny model zoo: build (train) it, or merge experts by task arithmetic")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser("build", help="train the zoo deterministically (cached by recipe hash)")
    zb.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    zb.add_argument("--cache-dir", default=None, help="where to build (default: $LOGITFUSION_CACHE or ~/.cache)")
    zb.set_defaults(func=_cmd_zoo_build)
    zm = zsub.add_parser("merge", help="write S + sum_t lambda_t (E_t - S) as one checkpoint")
    zm.add_argument("--base", required=True, help="small base model directory (or zoo:small)")
    zm.add_argument("--experts", required=True, nargs="+", help="expert model directories (or zoo:expert_<task>)")
    zm.add_argument("--lambdas", required=True, nargs="+", type=float, help="one weight per expert")
    zm.add_argument("--out", required=True, help="output directory")
    zm.set_defaults(func=_cmd_zoo_merge)

    ev = sub.add_parser("eval", help="evaluate fusion methods on the zoo tasks (docs/algorithms.md §10)")
    ev.add_argument("--json", default="results/eval.json", help="write the rows here")
    ev.add_argument("--limit", type=int, default=None, help="items per task (default: all held-out items)")
    ev.add_argument("--tasks", nargs="*", default=None, help="subset of tasks")
    ev.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    ev.set_defaults(func=_cmd_eval)

    de = sub.add_parser("demo", help="start the service on the zoo, send real requests, print fused answers")
    de.add_argument("--local", action="store_true", help="in-process decoder only (no Ray, no gRPC)")
    de.add_argument("--config", default=None, help="topology YAML (default: the packaged zoo topology)")
    de.set_defaults(func=_cmd_demo)

    sv = sub.add_parser("serve", help="serve a topology over gRPC through Ray Serve")
    sv.add_argument("--config", required=True, help="topology YAML")
    sv.add_argument("--address", default=None, help="join this Ray cluster (default: embedded local Ray)")
    sv.add_argument("--port", type=int, default=None, help="gRPC port (default: the topology's serve.grpc_port)")
    sv.add_argument("--http-port", type=int, default=None,
                    help="HTTP port of the OpenAI-style API (default: the topology's serve.http_port)")
    sv.set_defaults(func=_cmd_serve)

    ge = sub.add_parser("generate", help="stream a fused generation from a running service")
    ge.add_argument("prompt", help="prompt text")
    ge.add_argument("--address", default="127.0.0.1:9000", help="HOST:PORT of the service's gRPC ingress")
    ge.add_argument("--preset", default=None, help="recipe preset (default: the deployment's default)")
    ge.add_argument("--max-new-tokens", type=int, default=32)
    ge.add_argument("--temperature", type=float, default=0.0)
    ge.add_argument("--top-p", type=float, default=1.0)
    ge.add_argument("--top-k", type=int, default=0)
    ge.add_argument("--seed", type=int, default=None)
    ge.add_argument("--solver", default=None, choices=SOLVERS, help="override the DLF solver")
    ge.add_argument("--route-inner", default=None, choices=INNER_METHODS,
                    help="routed recipes: inner method")
    ge.add_argument("--route-tau", type=float, default=None, help="routed recipes: softmax temperature")
    ge.add_argument("--route-top-k", type=int, default=None, help="routed recipes: experts kept (0: all)")
    ge.add_argument("--draft", default=None, metavar="MODEL",
                    help="speculative decoding: the model that drafts (e.g. the recipe's expert)")
    ge.add_argument("--draft-tokens", type=int, default=None, metavar="K", help="tokens drafted per step (default 4)")
    ge.add_argument("--adaptive-draft", action="store_true", help="adapt the drafted tokens to the acceptance")
    ge.add_argument("--timeout-s", type=float, default=60.0)
    ge.set_defaults(func=_cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    _threads()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

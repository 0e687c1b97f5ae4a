"""``chitu``: serve a stage, bring up the local stack, generate, run a batch, build tiny checkpoints."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from services.config import load_config

    if args.stage == "encoder":
        from encoder_svc.config import EncoderServiceConfig as Cfg
        from encoder_svc.server import main
    elif args.stage == "denoiser":
        from denoiser_svc.config import DenoiserServiceConfig as Cfg
        from denoiser_svc.server import main
    elif args.stage == "vae":
        from vae_svc.config import VaeServiceConfig as Cfg
        from vae_svc.server import main
    else:
        from orchestrator.config import OrchestratorConfig as Cfg
        from orchestrator.server import main
    main(load_config(Cfg, args.config, args.set))
    return 0


def _parse_checkpoints(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" in item:
            name, path = item.split("=", 1)
        else:
            path = item
            name = Path(item).resolve().name
        out[name] = path
    return out


def _up(args: argparse.Namespace) -> int:
    from clients.stack import LocalStack, StackConfig
    from services.log import setup_logging

    setup_logging("chitu-up", "warning")
    overrides: dict[str, list[str]] = {}
    for item in args.set:
        kind, _, rest = item.partition(":")
        overrides.setdefault(kind, []).append(rest)
    from clients.stack import StackSecurityConfig
    from services.config import ConfigError

    security = StackSecurityConfig(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
                                   token_file=args.token_file)
    try:
        security.validate()
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    gpus = {}
    for item in args.gpus:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --gpus {item!r}: expected STAGE[:SERVICE]=LIST, e.g. denoiser=0,1")
        gpus[key] = value
    cfg = StackConfig(checkpoints=_parse_checkpoints(args.checkpoint), listen=args.listen, device=args.device,
                      dtype=args.dtype, log_level=args.log_level, stage_overrides=overrides, security=security,
                      stage_gpus=gpus)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = LocalStack(cfg, workdir=args.workdir)
    address = stack.start()
    print(f"chitu ready: orchestrator at {address} serving {stack.models} (logs: {stack.log_dir})", flush=True)
    try:
        stop.wait()
    finally:
        print("chitu: stopping", file=sys.stderr, flush=True)
        stack.stop()
    return 0


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from clients.client import ChituClient, GenerateOptions
    from clients.output import write_result

    opts = GenerateOptions(negative_prompt=args.negative, width=args.width, height=args.height, frames=args.frames,
                           steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                           formats=args.format or [], guidance_scale_2=args.guidance_2, fps=args.fps,
                           cache=args.cache)
    bar = None
    with ChituClient(args.server, security=_security(args)) as client:
        model = args.model
        if not model:
            models = client.list_models().models
            if not models:
                print("error: the server serves no models", file=sys.stderr)
                return 2
            model = models[0].name
        try:
            for event in client.generate(args.prompt, model, opts, timeout=args.timeout):
                kind = event.WhichOneof("event")
                if kind == "step":
                    if bar is None and sys.stderr.isatty():
                        from tqdm import tqdm

                        bar = tqdm(total=event.step.total_steps, desc="denoise", unit="step", file=sys.stderr)
                    if bar is not None:
                        bar.update(event.step.step - bar.n)
                    else:
                        print(f"step {event.step.step}/{event.step.total_steps} ({event.step.step_seconds:.3f}s)",
                              file=sys.stderr)
                elif kind == "stage_started" and bar is None:
                    print(f"{_stage_name(event.stage_started.stage)} started at {event.stage_started.endpoint}",
                          file=sys.stderr)
                elif kind == "result":
                    if bar is not None:
                        bar.close()
                    params = {"model": model, "prompt": args.prompt, "negative_prompt": args.negative}
                    paths = write_result(Path(args.output), event.request_id, event.result, params)
                    for w in event.result.warnings:
                        print(f"warning: {w}", file=sys.stderr)
                    for p in paths:
                        print(p)
        except grpc.RpcError as exc:
            if bar is not None:
                bar.close()
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def _stage_name(stage: int) -> str:
    from services.proto.chitu.v1 import common_pb2

    return common_pb2.Stage.Name(stage).removeprefix("STAGE_").lower()


def _add_security_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (TLS, mutual TLS, bearer token)")
    g.add_argument("--ca-file", default="", help="CA of the server's certificate: connect with TLS")
    g.add_argument("--cert-file", default="", help="client certificate (servers that require mutual TLS)")
    g.add_argument("--key-file", default="", help="private key of --cert-file")
    g.add_argument("--server-name", default="", help="name to check in the server's certificate")
    g.add_argument("--token-file", default="", help="file holding the bearer token (needs --ca-file)")


def _security(args: argparse.Namespace):  # noqa: ANN202 - ClientSecurityConfig, imported lazily
    from services.config import ClientSecurityConfig, ConfigError

    sec = ClientSecurityConfig(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
                               server_name=args.server_name, token_file=args.token_file)
    try:
        sec.validate("chitu")
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    return sec


def _models(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from clients.client import ChituClient

    with ChituClient(args.server, security=_security(args)) as client:
        print(json.dumps(MessageToDict(client.list_models()), indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    from clients.batch import run_batch

    out = run_batch(args.config, args.set)
    print(out)
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from services.assets import build_tiny

    out = Path(args.dir)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty", file=sys.stderr)
        return 2
    if out.exists():
        out.rmdir()
    print(build_tiny(args.family, out, seed=args.seed))
    return 0


def _gen_proto(args: argparse.Namespace) -> int:
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo / "scripts"))
    import gen_proto

    return gen_proto.main([])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chitu", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run one service (as a container would)")
    s.add_argument("stage", choices=["encoder", "denoiser", "vae", "orchestrator"])
    s.add_argument("--config", required=True, help="YAML config file")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    s.set_defaults(fn=_serve)

    s = sub.add_parser("up", help="start the whole stack locally (default: the embedded model)")
    s.add_argument("--listen", default="127.0.0.1:50051", help="orchestrator address (default 127.0.0.1:50051)")
    s.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                   help="serve a diffusers-format checkpoint folder (repeatable)")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--workdir", default=None, help="where configs and logs go (default: a temporary folder)")
    s.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                   help="config override for one stage kind, e.g. denoiser:engine.max_active_requests=2")
    s.add_argument("--gpus", action="append", default=[], metavar="STAGE[:SERVICE]=LIST",
                   help="GPUs a stage's processes see, e.g. denoiser=0,1 or denoiser:wan22.transformer_2=2,3 (repeatable)")
    g = s.add_argument_group("security: mutual TLS and a bearer token on every channel of the stack")
    g.add_argument("--ca-file", default="", help="CA that every service and client certificate chains to")
    g.add_argument("--cert-file", default="", help="certificate every service presents (server and client use)")
    g.add_argument("--key-file", default="", help="private key of --cert-file")
    g.add_argument("--token-file", default="", help="bearer token every service requires (first line)")
    s.set_defaults(fn=_up)

    s = sub.add_parser("generate", help="generate an image (progress on stderr, file paths on stdout)")
    s.add_argument("prompt")
    s.add_argument("--model", default="", help="served model (default: the first one)")
    s.add_argument("--server", default="127.0.0.1:50051")
    s.add_argument("--negative", default="", help="negative prompt (true-CFG models)")
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--frames", type=int, default=None)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--guidance-2", type=float, default=None,
                   help="guidance of the second (low-noise) expert of two-expert models (Wan2.2)")
    s.add_argument("--fps", type=float, default=None, help="frame rate of video output (video models)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--cache", default=None, metavar="STRATEGY[:KEY=VALUE,...]",
                   help="FlexCache policy, e.g. teacache:threshold=0.3 or meancache (default: full compute)")
    s.add_argument("--format", action="append", choices=["png", "mp4", "raw"], help="output format (repeatable)")
    s.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    s.add_argument("--output", default="outputs", help="directory for the result files")
    _add_security_args(s)
    s.set_defaults(fn=_generate)

    s = sub.add_parser("models", help="list the served models (JSON)")
    s.add_argument("--server", default="127.0.0.1:50051")
    _add_security_args(s)
    s.set_defaults(fn=_models)

    s = sub.add_parser("run", help="one-shot batch: bring the stack up, run the requests of CONFIG, shut down")
    s.add_argument("config")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(fn=_run)

    s = sub.add_parser("make-tiny-checkpoint", help="write a tiny random-weight checkpoint of a family")
    s.add_argument("family")
    s.add_argument("dir")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_make_tiny)

    s = sub.add_parser("gen-proto", help="regenerate the Python stubs from proto/")
    s.set_defaults(fn=_gen_proto)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())

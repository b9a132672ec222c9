"""`vlforge world make` (write a URL list with its truth) and `vlforge world serve` (the faulty web)."""

from __future__ import annotations

import argparse
import time

from vlforge.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    world = subparsers.add_parser("world", help="the demo world: make a URL list, serve it")
    sub = world.add_subparsers(dest="world_command", required=True, parser_class=type(world))

    make = sub.add_parser("make", help="write a URL list (parquet, csv, tsv or jsonl) with truth")
    make.add_argument("--n", type=int, required=True, help="rows (pairs) in the list")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--out", required=True, help="output file; the extension picks the format")
    make.add_argument("--base-url", default="http://127.0.0.1:8765", help="where `serve` listens")
    make.add_argument(
        "--mess-fraction",
        type=float,
        default=0.35,
        help="share of faulty/junk rows besides mismatched ones (0 = all clean; default 0.35)",
    )
    make.set_defaults(func=run_make)

    serve = sub.add_parser("serve", help="serve the world with injected faults until Ctrl-C")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument(
        "--hold-seconds", type=float, default=30.0, help="`timeout` rows wait this long"
    )
    serve.add_argument(
        "--slow-body-seconds", type=float, default=20.0, help="`slow_body` rows trickle this long"
    )
    serve.add_argument(
        "--cache-size", type=int, default=1024, help="rendered images kept in memory"
    )
    serve.set_defaults(func=run_serve)


def run_make(args: argparse.Namespace) -> int:
    from vlforge.world.mess import KINDS
    from vlforge.world.url_list import make_url_list, summarize

    if not args.base_url.startswith(("http://", "https://")):
        raise UserError(f"--base-url must start with http:// or https://, got {args.base_url!r}")
    started = time.perf_counter()
    path = make_url_list(args.n, args.seed, args.base_url, args.out, args.mess_fraction)
    counts = summarize(args.n, args.seed, args.mess_fraction)
    listed = " ".join(f"{name}={counts[name]}" for name in KINDS if counts[name])
    seconds = time.perf_counter() - started
    print(f"world: {args.n} rows (seed {args.seed}) -> {path} in {seconds:.1f} s; {listed}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from vlforge.world.server import WorldServer

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be within 0..65535, got {args.port}")
    try:
        server = WorldServer(
            args.host, args.port, args.hold_seconds, args.slow_body_seconds, args.cache_size
        )
    except OSError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from err
    with server:
        print(f"world: serving on {server.base_url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("world: stopped")
    return 0

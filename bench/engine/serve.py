"""The server side of bench_engine.py: `edgefleet device serve` with the batcher set from flags.

    python bench/engine/serve.py --model PATH --port N --token-file F [--max-batch B --max-wait-ms W]

The same calls as the CLI (load_for_serving, create_app, uvicorn) plus Engine.configure_batching,
which the CLI does not expose yet, --threads to size the runtime's thread pool and --precision to
serve the file the bench times raw (pinned.py).
"""

import argparse
from pathlib import Path
from typing import Any

import uvicorn
from pinned import PRECISIONS, load_pinned  # beside this script

from device.api import create_app
from device.engine.batcher import BatchConfig
from device.standalone import api_token


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--max-batch", type=int, default=1)
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="engine calls in flight at once")
    parser.add_argument("--threads", type=int, default=None, help="runtime threads (default: all cores)")
    parser.add_argument(
        "--http",
        default="edgefleet",
        help="edgefleet (the device's: infer answered by the protocol), or uvicorn's auto, h11, httptools",
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (and --ssl-keyfile)")
    parser.add_argument("--ssl-keyfile")
    args = parser.parse_args()
    engine, serving = load_pinned(args.model, args.precision, args.threads)
    engine.configure_batching(
        serving.manifest.name, BatchConfig(args.max_batch, args.max_wait_ms, args.max_queue, args.workers)
    )
    name = serving.manifest.name
    app = create_app(
        engine,
        lambda: {"models": [serving.describe()], "batching": engine.batcher_stats(name)},
        api_token(args.token_file),
    )
    # uvicorn's "auto" picks httptools and uvloop when they are importable, h11 and asyncio otherwise;
    # the loop stays uvicorn's choice (uvloop) in every case.
    options: dict[str, Any] = {} if args.http == "edgefleet" else {"http": args.http}
    if args.ssl_certfile:
        options |= {"ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile}
    try:
        from device.api.server import api_server_config
    except ImportError:  # an older tree given with --server-path (A/B runs): plain uvicorn, as it was
        config = uvicorn.Config(
            app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, **options
        )
    else:
        config = api_server_config(app, "127.0.0.1", args.port, **options)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()

"""The `flywheel` command line: up, demo, status, db, promote, rollback, approve."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import asyncpg
from grpc import aio as grpc_aio

from services.common.sealing import SealingError
from services.stack import (
    DEV_API_KEY,
    DEV_CONTROL_TOKEN,
    Stack,
    StackError,
    StackOptions,
)

STACK_FILE = "stack.json"


def _print(message: str) -> None:
    print(message, flush=True)


async def cmd_up(args: argparse.Namespace) -> int:
    """Run the embedded stack without simulated users until Ctrl-C."""
    stack = Stack(
        StackOptions(
            data_dir=Path(args.data_dir) / "stack", min_new_rated=args.min_new_rated
        ),
        on_progress=_print,
    )
    stop = asyncio.Event()
    try:
        await stack.start()
        info = {
            "gateway_url": stack.gateway_url,
            "api_key": DEV_API_KEY,
            "kafka": stack.broker.bootstrap_servers,
            "topic_prefix": stack.options.topic_prefix,
            "postgres_dsn": stack.postgres.dsn,
            "db_schema": stack.options.db_schema,
            "control_address": stack.control_address,
            "control_token": DEV_CONTROL_TOKEN,
            "metrics": {
                name: stack.metrics_url(name)
                for name in ("gateway", "collector", "analyzer", "trainer")
            },
            "route": stack.options.route,
        }
        (Path(args.data_dir) / STACK_FILE).write_text(json.dumps(info, indent=2))
        _print(json.dumps(info, indent=2))
        _print(
            "Flywheel is up. Point an OpenAI client at the gateway; Ctrl-C stops it."
        )
        while not stop.is_set():
            await asyncio.sleep(1)
            stack.check_alive()
    finally:
        _print("stopping every process")
        stack.stop()
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from services.demo.runner import DemoOptions, run_demo

    options = DemoOptions(
        data_dir=Path(args.data_dir),
        users=args.users,
        questions=args.questions,
        held_out=args.held_out,
        concurrency=args.concurrency,
        min_new_rated=args.min_new_rated,
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        rollout_steps=[int(s) for s in args.rollout_steps.split(",")],
        min_rated_per_arm=args.min_rated_per_arm,
        max_rated_per_arm=args.max_rated_per_arm,
        after_decision=args.after_decision,
        pause_while_training=not args.no_pause,
        max_minutes=args.max_minutes,
        seed=args.seed,
        report_dir=Path(args.report_dir),
    )
    result = await run_demo(options)
    _print("")
    for line in result.report.lines():
        _print(line)
    _print(f"\nChart: {result.chart_path}")
    return 0 if result.phase in ("promoted", "rolled_back", "rejected") else 1


def _stack_info(data_dir: str) -> dict[str, Any]:
    path = Path(data_dir) / STACK_FILE
    if not path.exists():
        raise SystemExit(
            f"no running stack found ({path} missing): start one with `flywheel up`"
        )
    return json.loads(path.read_text())  # type: ignore[no-any-return]


async def cmd_status(args: argparse.Namespace) -> int:
    """What runs, topic lag, row counts, the active routing table."""
    import httpx

    from services.common import db
    from services.common.settings import KafkaSettings, PostgresSettings
    from services.demo.runner import loop_state
    from services.status import consumer_lag

    info = _stack_info(args.data_dir)
    async with httpx.AsyncClient(timeout=2) as client:
        for name, url in info["metrics"].items():
            try:
                up = (await client.get(url)).status_code == 200
            except httpx.HTTPError:
                up = False
            _print(f"{name:<10} {'up' if up else 'DOWN':<5} {url}")
    kafka = KafkaSettings(
        bootstrap_servers=info["kafka"], topic_prefix=info["topic_prefix"]
    )
    try:
        for group, lag in (await consumer_lag(kafka, ["collector"])).items():
            _print(f"consumer group {group}: lag {lag}")
    except Exception as error:  # noqa: BLE001 - a status line, never a crash
        # The embedded broker answers the group-offsets request in a shape aiokafka
        # cannot parse; a real Kafka cluster answers it.
        _print(f"consumer lag: unavailable ({type(error).__name__})")
    pg = PostgresSettings(dsn=info["postgres_dsn"], db_schema=info["db_schema"])
    pool = await db.create_pool(pg)
    try:
        state = await loop_state(pool, info["route"])
    finally:
        await pool.close()
    _print(
        f"rows: {state['interactions']} interactions, {state['feedback']} feedback, "
        f"{state['datasets']} datasets"
    )
    for version in state["versions"]:
        _print(f"version {version['version_id']:<20} {version['state']}")
    if state["routing"]:
        _print(f"routing table v{state['routing']['version']}:")
        _print(json.dumps(state["routing"]["body"]["routes"], indent=2))
    return 0


async def cmd_report(args: argparse.Namespace) -> int:
    """`flywheel report --since 7d`: HTML with PNG charts from PostgreSQL."""
    from services.report.__main__ import run

    if not args.dsn and (Path(args.data_dir) / STACK_FILE).exists():
        info = _stack_info(args.data_dir)
        args.dsn, args.schema = info["postgres_dsn"], args.schema or info["db_schema"]
    return await asyncio.to_thread(run, args)


async def cmd_migrate(args: argparse.Namespace) -> int:
    from services.common import db
    from services.common.settings import PostgresSettings

    settings = PostgresSettings(dsn=args.dsn, db_schema=args.schema)
    applied = await db.migrate(settings)
    _print(f"applied: {applied or 'nothing, schema is current'}")
    return 0


async def cmd_rotate_key(args: argparse.Namespace) -> int:
    """`flywheel db rotate-key`: re-seal message content to the active key."""
    from pydantic import ValidationError

    from services.common import db
    from services.common.key_rotation import RotationSettings, rotate_content_key
    from services.common.settings import PostgresSettings

    try:
        keyring = RotationSettings.load().encryption.keyring
    except ValidationError as error:
        problems = "; ".join(str(item["msg"]) for item in error.errors())
        print(f"flywheel: encryption settings: {problems}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("flywheel: --batch-size must be at least 1", file=sys.stderr)
        return 2
    settings = PostgresSettings(dsn=args.dsn, db_schema=args.schema, pool_min_size=0)
    pool = await db.create_pool(settings)
    try:
        result = await rotate_content_key(pool, keyring, batch_size=args.batch_size)
    finally:
        await pool.close()
    counts = ", ".join(f"{table} {n}" for table, n in result.resealed.items())
    _print(
        f"re-sealed {result.total_resealed} rows to key {keyring.active_key_id!r}"
        f" ({counts})"
    )
    left = {table: n for table, n in result.remaining.items() if n}
    if left:
        _print(f"still on another key (locked or written meanwhile): {left}; run again")
    return 0


async def cmd_db(args: argparse.Namespace) -> int:
    if args.db_command == "rotate-key":
        return await cmd_rotate_key(args)
    return await cmd_migrate(args)


async def cmd_manual(args: argparse.Namespace) -> int:
    """`flywheel promote` / `flywheel rollback` through the control plane."""
    from services.common.control import auth_metadata, open_channel
    from services.common.pb.flywheel.v1 import control_pb2 as pb
    from services.common.pb.flywheel.v1 import control_pb2_grpc as pb_grpc
    from services.common.settings import ControlPlaneSettings

    info = _stack_info(args.data_dir) if not args.address else {}
    settings = ControlPlaneSettings(
        address=args.address or info["control_address"],
        token=args.token or info.get("control_token", DEV_CONTROL_TOKEN),
    )
    request = pb.ManualActionRequest(route=args.route, reason=args.reason)
    async with open_channel(settings) as channel:
        stub = pb_grpc.RolloutServiceStub(channel)
        call = stub.Promote if args.command == "promote" else stub.RollBack
        ack = await call(request, metadata=auth_metadata(settings), timeout=10)
    _print(f"{ack.action}; routing table now v{ack.routing_version}")
    return 0


async def cmd_approve(args: argparse.Namespace) -> int:
    """`flywheel approve`: record an approval in PostgreSQL for the trainer to apply."""
    import getpass

    from services.common import db
    from services.common.settings import PostgresSettings
    from services.trainer.approvals import outcome_of, record_approval

    if args.dsn:
        dsn, schema = args.dsn, args.schema
    else:
        info = _stack_info(args.data_dir)
        dsn, schema = info["postgres_dsn"], info["db_schema"]
    settings = PostgresSettings(dsn=dsn, db_schema=schema, pool_min_size=0)
    pool = await db.create_pool(settings)
    try:
        approval_id = await record_approval(
            pool,
            args.route,
            approved_by=args.by or getpass.getuser(),
            version_id=args.version or None,
            reason=args.reason,
        )
        _print(f"approval {approval_id} recorded for route {args.route}")
        deadline = asyncio.get_running_loop().time() + args.wait
        outcome = await outcome_of(pool, approval_id)
        while outcome is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.5)
            outcome = await outcome_of(pool, approval_id)
    finally:
        await pool.close()
    if outcome is None:
        _print("the trainer has not applied it yet; it will on its next poll")
    else:
        _print(f"the trainer applied it: {outcome}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__)
    parser.add_argument("--data-dir", default=".data", help="where local state lives")
    # Also accepted after the subcommand (`flywheel demo --data-dir X`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser(
        "up", parents=[common], help="run the embedded stack until Ctrl-C"
    )
    up.add_argument(
        "--min-new-rated",
        type=int,
        default=200,
        help="new rated interactions that start a training run",
    )

    demo = commands.add_parser(
        "demo", parents=[common], help="turn the whole loop once with simulated users"
    )
    demo.add_argument("--users", type=int, default=200, help="simulated users")
    demo.add_argument("--questions", type=int, default=48, help="countries asked about")
    demo.add_argument(
        "--held-out",
        type=int,
        default=12,
        help="of those, kept out of training (asked with metadata split=eval)",
    )
    demo.add_argument("--concurrency", type=int, default=2, help="users asking at once")
    demo.add_argument(
        "--min-new-rated",
        type=int,
        default=160,
        help="rated interactions that start the training run",
    )
    demo.add_argument(
        "--epochs", type=int, default=8, help="LoRA epochs over the dataset"
    )
    demo.add_argument("--max-steps", type=int, default=None, help="cap on LoRA steps")
    demo.add_argument("--learning-rate", type=float, default=1e-3)
    demo.add_argument(
        "--rollout-steps",
        default="50",
        help="canary percentages, comma-separated (e.g. 5,25,50)",
    )
    demo.add_argument(
        "--min-rated-per-arm",
        type=int,
        default=30,
        help="rated answers per arm before the analyzer may decide",
    )
    demo.add_argument(
        "--max-rated-per-arm",
        type=int,
        default=150,
        help="rated answers per arm after which an undecided test rolls back",
    )
    demo.add_argument(
        "--after-decision",
        type=int,
        default=40,
        help="questions asked after the decision, to show its effect",
    )
    demo.add_argument("--max-minutes", type=float, default=14.0, help="hard time limit")
    demo.add_argument(
        "--no-pause",
        action="store_true",
        help="keep users asking while the candidate trains (slower on 2 cores)",
    )
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument(
        "--report-dir", default="reports", help="where the PNG chart goes"
    )

    commands.add_parser(
        "status", parents=[common], help="what runs, topic lag, rows, routing table"
    )

    from services.report.__main__ import add_arguments as add_report_arguments

    report = commands.add_parser(
        "report",
        parents=[common],
        help="KPIs per model version and decided experiments (HTML + PNG)",
    )
    add_report_arguments(report)

    database = commands.add_parser("db", parents=[common], help="database commands")
    db_commands = database.add_subparsers(dest="db_command", required=True)
    migrate = db_commands.add_parser(
        "migrate", parents=[common], help="apply pending migrations"
    )
    migrate.add_argument("--dsn", required=True)
    migrate.add_argument("--schema", default="flywheel")
    rotate = db_commands.add_parser(
        "rotate-key",
        parents=[common],
        help="re-seal stored message content to FLYWHEEL_ENCRYPTION__ACTIVE_KEY",
    )
    rotate.add_argument("--dsn", required=True)
    rotate.add_argument("--schema", default="flywheel")
    rotate.add_argument(
        "--batch-size", type=int, default=500, help="rows per transaction"
    )

    for name in ("promote", "rollback"):
        manual = commands.add_parser(
            name, parents=[common], help=f"{name} the running rollout by hand"
        )
        manual.add_argument("route")
        manual.add_argument("--reason", default=f"manual {name}")
        manual.add_argument("--address", default="", help="trainer gRPC host:port")
        manual.add_argument("--token", default="", help="control-plane token")

    approve = commands.add_parser(
        "approve",
        parents=[common],
        help="approve what waits on a route under the `approve` rollout policy",
    )
    approve.add_argument("route")
    approve.add_argument("--version", default="", help="only this model version")
    approve.add_argument("--reason", default="")
    approve.add_argument("--by", default="", help="who approves (default: you)")
    approve.add_argument(
        "--dsn", default="", help="PostgreSQL DSN (default: the running stack's)"
    )
    approve.add_argument("--schema", default="flywheel")
    approve.add_argument(
        "--wait", type=float, default=10.0, help="seconds to wait for the outcome"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "up": cmd_up,
        "demo": cmd_demo,
        "status": cmd_status,
        "report": cmd_report,
        "db": cmd_db,
        "promote": cmd_manual,
        "rollback": cmd_manual,
        "approve": cmd_approve,
    }
    # SIGTERM and SIGHUP stop the stack like Ctrl-C does (the `finally` blocks stop
    # every child); SIGINT too, also when a parent shell started us ignoring it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    try:
        return asyncio.run(handlers[args.command](args))
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", file=sys.stderr)
        return 130
    except grpc_aio.AioRpcError as error:
        print(
            f"flywheel: control plane: {error.code().name}: {error.details()}",
            file=sys.stderr,
        )
        return 1
    except (OSError, asyncpg.PostgresError, StackError, SealingError) as error:
        print(f"flywheel: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Gateway overhead: the latency our gateway adds over a fast upstream, at fixed rates.

`python -m bench.gateway [--rates 100,500,1000] [--modes ns,stream] [--duration 10]`
measures the way `../shared/peerbench/` measured LiteLLM and TensorZero, with its own
tools invoked by path (never copied): its `stub.py` as the upstream and `wrk` driven
by its `chat.lua` at a constant rate (open loop). The gateway runs as its own process
(`python -m services.gateway`) on one core with Kafka logging on (an embedded broker,
topics declared first); wrk, the stub and the broker share the other core.

For each mode and rate it runs wrk straight to the stub (the baseline) and through
the gateway, and prints p50/p90/p99 of both, the difference (added latency), the
gateway's p50 as a ratio of the baseline's, the achieved rate, the gateway's CPU per
request (from /proc), and at the end whether every answered request's interaction
event was acknowledged by the broker (the gateway's own counters).

With the peers installed as `../shared/peerbench/README.md` says (in
`$PEERBENCH_HOME`, default `~/peerbench`: a venv `venv` with `litellm[proxy]` and a venv
`venv-tz` with `tensorzero`, never in the project's environment), the LiteLLM proxy
(one worker) and TensorZero's gateway (logging off) run in the same session as extra
targets, each alone on the gateway's core while it is measured, routed to the same
stub; the table then compares the added latencies. `--no-peers` leaves them out.

Needs `wrk` (`apt-get install -y wrk`) and a Python with uvloop, httptools and orjson
for the stub (`--stub-python`, default this interpreter if it has them, else
`$PEERBENCH_HOME/venv/bin/python`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.common.embedded import EmbeddedBroker, free_port, stop_process
from services.common.kafka import Topics, ensure_topics
from services.common.routing import Route, RoutingTable, Variant
from services.common.settings import KafkaSettings
from services.gateway.settings import hash_api_key

REPO = Path(__file__).resolve().parents[1]
PEERBENCH = Path(os.environ.get("PEERBENCH_DIR", REPO.parent / "shared" / "peerbench"))
PEERBENCH_HOME = Path(os.environ.get("PEERBENCH_HOME", Path.home() / "peerbench"))
LITELLM = PEERBENCH_HOME / "venv" / "bin" / "litellm"
TENSORZERO_PYTHON = PEERBENCH_HOME / "venv-tz" / "bin" / "python"
TENSORZERO_URL = re.compile(r"base_url=(\S+)")
API_KEY = "sk-bench"  # chat.lua's default bearer key
ROUTE = "stub-model"  # chat.lua's default model
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RESULT_LINE = re.compile(r"^RESULT (.*)$", re.M)
READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 60.0


@dataclass
class Target:
    """Something wrk can load: the stub itself, or a gateway in front of it."""

    name: str
    url: str
    pid: int | None = None
    path: str = "/v1/chat/completions"
    model: str = ROUTE
    auth: str = API_KEY


@dataclass
class Run:
    """One wrk run's numbers (wrk's RESULT line) and the target's CPU seconds."""

    target: str
    mode: str
    rate: int
    result: dict[str, float] = field(default_factory=dict)
    cpu_s: float | None = None

    def get(self, key: str) -> float:
        return self.result.get(key, float("nan"))

    @property
    def saturated(self) -> bool:
        """Not a constant-rate result: the target fell behind the schedule."""
        requests = max(1.0, self.get("requests"))
        return (
            self.get("achieved_rps") < 0.95 * self.rate
            or self.get("late_sends") > 0.01 * requests
            or self.get("err_timeout") > 0
        )

    @property
    def cpu_ms_per_request(self) -> float:
        if self.cpu_s is None or not self.get("requests"):
            return float("nan")
        return 1000 * self.cpu_s / self.get("requests")


def tree_cpu_s(root: int) -> float:
    """utime + stime of a process and its live descendants, in seconds."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat is not None:
                children.setdefault(int(stat[1]), []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        stat = _read_stat(pid)
        if stat is not None:
            total += int(stat[11]) + int(stat[12])
            todo.extend(children.get(pid, []))
    return total / CLOCK_TICKS


def _read_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def pin(cpus: str | None, command: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *command] if cpus else command


def run_wrk(target: Target, mode: str, rate: int, args: argparse.Namespace) -> Run:
    """One constant-rate wrk run (rate 0: closed loop) with chat.lua."""
    env = {
        **os.environ,
        "PATH_": target.path,
        "MODEL": target.model,
        "AUTH": target.auth,
        "STREAM": "1" if mode == "stream" else "0",
        "RATE": str(rate),
        "THREADS": "1",
    }
    command = [
        "wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s",
        "--timeout", "10s", "-s", str(PEERBENCH / "chat.lua"), target.url,
    ]  # fmt: skip
    before = tree_cpu_s(target.pid) if target.pid else None
    done = subprocess.run(
        pin(args.load_cpus, command),
        env=env,
        capture_output=True,
        text=True,
        timeout=args.duration + 60,
        check=False,
    )
    run = Run(target=target.name, mode=mode, rate=rate)
    if before is not None and target.pid:
        run.cpu_s = tree_cpu_s(target.pid) - before
    match = RESULT_LINE.search(done.stdout)
    if match is None:
        raise RuntimeError(f"wrk gave no RESULT line: {done.stdout}{done.stderr}")
    for pair in match.group(1).split():
        key, _, value = pair.partition("=")
        run.result[key] = float(value)
    return run


def wait_http_ok(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")


def gateway_counts(url: str) -> dict[str, float]:
    """Requests answered and interaction events acknowledged, from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5, trust_env=False).text
    counts = {"requests": 0.0, "published": 0.0, "dropped": 0.0, "spooled": 0.0}
    names = {
        "flywheel_gateway_requests": "requests",
        "flywheel_gateway_events_published": "published",
        "flywheel_gateway_events_dropped": "dropped",
        "flywheel_gateway_events_spooled": "spooled",
    }
    for family in text_string_to_metric_families(text):
        key = names.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                counts[key] += sample.value
    return counts


class Bench:
    """Starts the broker, the stub and the gateway; stops exactly those."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.broker = EmbeddedBroker(data_dir=workdir / "broker", port=free_port())
        self.kafka = KafkaSettings(
            bootstrap_servers=self.broker.bootstrap_servers,
            topic_prefix="bench.",
            producer_max_batch_bytes=args.batch_bytes,
        )

    def start(self) -> list[Target]:
        # 1. The broker, on the load generator's core, and the topics.
        self.broker.start()
        assert self.broker.process is not None
        if self.args.load_cpus:
            subprocess.run(
                ["taskset", "-a", "-p", "-c", self.args.load_cpus,
                 str(self.broker.process.pid)],
                check=True, capture_output=True,
            )  # fmt: skip
        asyncio.run(ensure_topics(self.kafka, Topics("bench.").all()))
        # 2. The peerbench stub, on the same core.
        stub_port = free_port()
        stub = self._spawn(
            pin(
                self.args.load_cpus,
                [
                    self.args.stub_python,
                    str(PEERBENCH / "stub.py"),
                    "--port",
                    str(stub_port),
                ],
            ),  # fmt: skip
            "stub",
        )
        stub_url = f"http://127.0.0.1:{stub_port}"
        wait_http_ok(f"{stub_url}/health", stub, READY_TIMEOUT_S)
        # 3. The gateway, alone on its core, routing to the stub.
        gateway_port = free_port()
        gateway = self._spawn(
            pin(self.args.gateway_cpu, [sys.executable, "-m", "services.gateway"]),
            "gateway",
            env=self._gateway_env(gateway_port, stub_url),
        )
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        wait_http_ok(f"{gateway_url}/healthz", gateway, READY_TIMEOUT_S)
        targets = [
            Target("direct", stub_url, stub.pid),
            Target("gateway", gateway_url, gateway.pid),
        ]
        # 4. The peers, on the gateway's core, each idle while another is measured.
        if self.args.peers:
            targets.append(self._start_litellm(stub_url))
            targets.append(self._start_tensorzero(stub_url))
        return targets

    def _start_litellm(self, stub_url: str) -> Target:
        """The LiteLLM proxy, one worker, no database, routed to the stub."""
        config = self.workdir / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {ROUTE}\n"
            "    litellm_params:\n"
            f"      model: openai/{ROUTE}\n"
            f"      api_base: {stub_url}/v1\n"
            "      api_key: sk-stub\n"
            "litellm_settings:\n"
            "  set_verbose: false\n"
            "  telemetry: false\n"
            "  drop_params: true\n"
        )
        # A throwaway master key: LiteLLM refuses to start without one.
        master_key = f"sk-bench-{secrets.token_hex(16)}"
        port = free_port()
        process = self._spawn(
            pin(
                self.args.gateway_cpu,
                [
                    str(LITELLM),
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--num_workers",
                    "1",
                ],
            ),  # fmt: skip
            "litellm",
            env={
                **os.environ,
                "LITELLM_MASTER_KEY": master_key,
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_LOG": "ERROR",
                "LITELLM_TELEMETRY": "False",
            },
        )
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{url}/health/liveliness", process, 180.0)
        return Target("litellm", url, process.pid, auth=master_key)

    def _start_tensorzero(self, stub_url: str) -> Target:
        """TensorZero's Rust gateway from its wheel, observability off."""
        config = self.workdir / "tensorzero.toml"
        config.write_text(
            "[gateway.observability]\nenabled = false\n\n"
            '[models.stub]\nrouting = ["stub"]\n\n'
            '[models.stub.providers.stub]\ntype = "openai"\n'
            f'api_base = "{stub_url}/v1/"\n'
            f'model_name = "{ROUTE}"\napi_key_location = "none"\n'
        )
        process = self._spawn(
            pin(
                self.args.gateway_cpu,
                [str(TENSORZERO_PYTHON), str(PEERBENCH / "tz_gateway.py"), str(config)],
            ),
            "tensorzero",
            env={**os.environ, "TENSORZERO_DISABLE_PSEUDONYMOUS_USAGE_ANALYTICS": "1"},
        )
        log = self.workdir / "tensorzero.log"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (match := TENSORZERO_URL.search(log.read_text())) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"TensorZero did not start: {log.read_text()}")
            time.sleep(0.2)
        url = match.group(1).removesuffix("/openai/v1")
        return Target(
            "tensorzero",
            url,
            process.pid,
            path="/openai/v1/chat/completions",
            model="tensorzero::model_name::stub",
        )

    def _gateway_env(self, port: int, stub_url: str) -> dict[str, str]:
        table = RoutingTable(
            version=1,
            routes={
                ROUTE: Route(
                    name=ROUTE,
                    variants=(Variant("stub", f"{stub_url}/v1", ROUTE, 10_000),),
                )
            },
        )
        table_file = self.workdir / "routing.json"
        table_file.write_text(json.dumps(table.to_json()))
        return {
            **os.environ,
            "FLYWHEEL_GATEWAY_HOST": "127.0.0.1",
            "FLYWHEEL_GATEWAY_PORT": str(port),
            "FLYWHEEL_GATEWAY_ROUTING_TABLE_FILE": str(table_file),
            "FLYWHEEL_GATEWAY_API_KEYS": json.dumps({hash_api_key(API_KEY): "bench"}),
            "FLYWHEEL_GATEWAY_PSEUDONYM_KEY": "bench-pseudonym-key",
            "FLYWHEEL_GATEWAY_SPOOL_DIR": str(self.workdir / "spool"),
            "FLYWHEEL_GATEWAY_LOGGING__LEVEL": "WARNING",
            "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "FLYWHEEL_KAFKA__TOPIC_PREFIX": self.kafka.topic_prefix,
            "FLYWHEEL_KAFKA__PRODUCER_MAX_BATCH_BYTES": str(self.args.batch_bytes),
        }

    def _spawn(
        self, command: list[str], name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process(process, grace_s=20)
        self.broker.stop()


def wait_all_published(url: str) -> dict[str, float]:
    """Poll the gateway's counters until every answered request's event is acked."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        counts = gateway_counts(url)
        if counts["published"] >= counts["requests"] or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


def measure(args: argparse.Namespace, targets: list[Target]) -> list[Run]:
    gateway = next(target for target in targets if target.name == "gateway")
    for target in targets:  # warm-up, not recorded
        for mode in args.modes:
            run_wrk(
                target, mode, 0, argparse.Namespace(**{**vars(args), "duration": 3})
            )
    runs = []
    for mode in args.modes:
        for rate in args.rates:
            for target in targets:
                # The gateway's core is the peers' too: let it finish publishing
                # (replaying what it spooled) before anything else is measured.
                wait_all_published(gateway.url)
                time.sleep(args.pause)
                run = run_wrk(target, mode, rate, args)
                runs.append(run)
                print(
                    f"{target.name:>8} {mode:>6} rate={rate:<5} "
                    f"rps={run.get('achieved_rps'):.0f} p50={run.get('p50_ms'):.3f} "
                    f"p99={run.get('p99_ms'):.3f} late={run.get('late_sends'):.0f} "
                    f"non200={run.get('non200'):.0f} "
                    f"cpu/req={run.cpu_ms_per_request:.3f}ms",
                    flush=True,
                )
    return runs


def table(runs: list[Run]) -> str:
    """Markdown: baseline and gateway percentiles, the difference, rate and CPU."""
    by_key = {(run.target, run.mode, run.rate): run for run in runs}
    lines = [
        "| target | mode | rate req/s | direct p50/p90/p99 ms | target p50/p90/p99 ms "
        "| added p50/p90/p99 ms | target/direct p50 | achieved req/s "
        "| target CPU ms/req | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        if run.target == "direct":
            continue
        base = by_key[("direct", run.mode, run.rate)]
        cells = ("p50_ms", "p90_ms", "p99_ms")
        added = "/".join(f"{run.get(c) - base.get(c):.2f}" for c in cells)
        note = "SATURATED" if run.saturated else ""
        if run.get("non200") or base.saturated:
            note += f" non200={run.get('non200'):.0f} direct_sat={base.saturated}"
        mode = "streaming" if run.mode == "stream" else "non-streaming"
        lines.append(
            f"| {run.target} | {mode} "
            f"| {run.rate} | {'/'.join(f'{base.get(c):.2f}' for c in cells)} "
            f"| {'/'.join(f'{run.get(c):.2f}' for c in cells)} | {added} "
            f"| {run.get('p50_ms') / base.get('p50_ms'):.2f}x "
            f"| {run.get('achieved_rps'):.0f} | {run.cpu_ms_per_request:.3f} "
            f"| {note.strip()} |"
        )
    return "\n".join(lines)


def comparison(runs: list[Run]) -> str:
    """Markdown: our added latency against each peer's, as ratios, per mode and rate.

    "x less than LiteLLM" is LiteLLM's added p50 over ours (goal: at least 10);
    "x TensorZero" is ours over TensorZero's (goal: at most 3). A saturated run has
    no constant-rate latency to compare: its cell says so.
    """
    by_key = {(run.target, run.mode, run.rate): run for run in runs}

    def added(target: str, mode: str, rate: int, cell: str) -> float | None:
        run, base = by_key.get((target, mode, rate)), by_key[("direct", mode, rate)]
        if run is None or run.saturated:
            return None
        return max(run.get(cell) - base.get(cell), 0.001)

    lines = [
        "| mode | rate req/s | added p50 ms ours / LiteLLM / TensorZero "
        "| added p99 ms ours / LiteLLM / TensorZero | x less than LiteLLM (p50) "
        "| x TensorZero (p50) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    keys = sorted({(run.mode, run.rate) for run in runs}, key=lambda k: (k[0], k[1]))
    for mode, rate in keys:
        cells = {}
        for cell in ("p50_ms", "p99_ms"):
            cells[cell] = [
                added(target, mode, rate, cell)
                for target in ("gateway", "litellm", "tensorzero")
            ]

        def show(value: float | None) -> str:
            return "saturated" if value is None else f"{value:.2f}"

        ours, litellm, tensorzero = cells["p50_ms"]
        versus_litellm = (
            "LiteLLM saturated"
            if litellm is None
            else "ours saturated"
            if ours is None
            else f"{litellm / ours:.1f}x"
        )
        versus_tz = (
            "n/a" if ours is None or tensorzero is None else f"{ours / tensorzero:.1f}x"
        )
        lines.append(
            f"| {'streaming' if mode == 'stream' else 'non-streaming'} | {rate} "
            f"| {' / '.join(show(v) for v in cells['p50_ms'])} "
            f"| {' / '.join(show(v) for v in cells['p99_ms'])} "
            f"| {versus_litellm} | {versus_tz} |"
        )
    return "\n".join(lines)


def default_stub_python() -> str:
    probe = subprocess.run(
        [sys.executable, "-c", "import uvloop, httptools, orjson"],
        capture_output=True,
        check=False,
    )
    if probe.returncode == 0:
        return sys.executable
    home = Path(os.environ.get("PEERBENCH_HOME", Path.home() / "peerbench"))
    return str(home / "venv" / "bin" / "python")


def parse_args(argv: list[str]) -> argparse.Namespace:
    two_cores = (os.cpu_count() or 1) >= 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100,500,1000")
    parser.add_argument("--modes", default="ns,stream")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--pause", type=float, default=2.0)
    parser.add_argument("--gateway-cpu", default="1" if two_cores else None)
    parser.add_argument("--load-cpus", default="0" if two_cores else None)
    parser.add_argument("--stub-python", default=None)
    # The gateway producer's batch: 1, as the embedded stack runs (one record per
    # produce request, see KafkaSettings.producer_max_batch_bytes); 16384 is a Kafka
    # cluster's default.
    parser.add_argument("--batch-bytes", type=int, default=1)
    parser.add_argument(
        "--no-peers",
        dest="peers",
        action="store_false",
        help="leave LiteLLM and TensorZero out even when installed",
    )
    args = parser.parse_args(argv)
    if args.peers and not (LITELLM.exists() and TENSORZERO_PYTHON.exists()):
        print(
            f"peers not measured: no {LITELLM} or {TENSORZERO_PYTHON} (see "
            "../shared/peerbench/README.md to install them)",
            file=sys.stderr,
        )
        args.peers = False
    args.rates = [int(rate) for rate in args.rates.split(",") if rate]
    args.modes = [mode for mode in args.modes.split(",") if mode]
    args.stub_python = args.stub_python or default_stub_python()
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is missing: apt-get install -y wrk", file=sys.stderr)
        return 2
    if not Path(args.stub_python).exists():
        print(
            f"no Python with uvloop/httptools/orjson for the stub at "
            f"{args.stub_python}; pass --stub-python",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            targets = bench.start()
            runs = measure(args, targets)
            counts = wait_all_published(targets[1].url)
        finally:
            bench.stop()
    print()
    print(
        f"gateway on CPU {args.gateway_cpu}, wrk/stub/broker on CPU {args.load_cpus}, "
        f"gateway producer batch {args.batch_bytes} bytes, {args.duration} s per row"
    )
    print(table(runs))
    if args.peers:
        print()
        print(comparison(runs))
    lost = counts["requests"] - counts["published"]
    print(
        f"\nevents: {counts['requests']:.0f} chat requests answered (warm-up "
        f"included), {counts['published']:.0f} events acknowledged by the broker, "
        f"{counts['spooled']:.0f} spooled, {counts['dropped']:.0f} dropped, "
        f"{max(0.0, lost):.0f} missing"
    )
    return 0 if lost <= 0 and not counts["dropped"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

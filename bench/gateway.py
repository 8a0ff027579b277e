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
        "MODEL": ROUTE,
        "AUTH": API_KEY,
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
            producer_max_batch_bytes=1,
        )

    def start(self) -> tuple[Target, Target]:
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
        return (
            Target("direct", stub_url, stub.pid),
            Target("gateway", gateway_url, gateway.pid),
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
            "FLYWHEEL_KAFKA__PRODUCER_MAX_BATCH_BYTES": "1",
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


def measure(args: argparse.Namespace, direct: Target, gateway: Target) -> list[Run]:
    for target in (direct, gateway):  # warm-up, not recorded
        for mode in args.modes:
            run_wrk(
                target, mode, 0, argparse.Namespace(**{**vars(args), "duration": 3})
            )
    runs = []
    for mode in args.modes:
        for rate in args.rates:
            for target in (direct, gateway):
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
        "| mode | rate req/s | direct p50/p90/p99 ms | gateway p50/p90/p99 ms "
        "| added p50/p90/p99 ms | gateway/direct p50 | achieved req/s "
        "| gateway CPU ms/req | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        if run.target != "gateway":
            continue
        base = by_key[("direct", run.mode, run.rate)]
        cells = ("p50_ms", "p90_ms", "p99_ms")
        added = "/".join(f"{run.get(c) - base.get(c):.2f}" for c in cells)
        note = "SATURATED" if run.saturated else ""
        if run.get("non200") or base.saturated:
            note += f" non200={run.get('non200'):.0f} direct_sat={base.saturated}"
        lines.append(
            f"| {'streaming' if run.mode == 'stream' else 'non-streaming'} "
            f"| {run.rate} | {'/'.join(f'{base.get(c):.2f}' for c in cells)} "
            f"| {'/'.join(f'{run.get(c):.2f}' for c in cells)} | {added} "
            f"| {run.get('p50_ms') / base.get('p50_ms'):.2f}x "
            f"| {run.get('achieved_rps'):.0f} | {run.cpu_ms_per_request:.3f} "
            f"| {note.strip()} |"
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
    args = parser.parse_args(argv)
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
            direct, gateway = bench.start()
            runs = measure(args, direct, gateway)
            counts = wait_all_published(gateway.url)
        finally:
            bench.stop()
    print()
    print(table(runs))
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

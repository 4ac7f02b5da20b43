"""Load benchmark of `POST /v1/credentials` for an aws backend against moto, and of a direct
aioboto3 `AssumeRoleWithWebIdentity` call against the same moto in the same run.

What runs on 127.0.0.1 (all stopped by PID at the end):
- `moto_server` (STS, IAM): it accepts any web-identity token, so both paths cost it the same;
- OpenBao dev server (the broker's key ring and session key live there);
- the broker in its own process (`--serve` mode of this script: started services, SQLite,
  audit log, one aws backend whose `sts_endpoint` is moto), served with aiohttp;
- this process: an aiohttp client keeping `concurrency` requests in flight against the broker,
  and an aioboto3 STS client doing the same directly against moto (baseline).

Each target runs `rounds` times for `duration` seconds, interleaved; the report gives medians
of p50/p99 latency and req/s, and the ratio broker/direct (goal: p50 ratio <= 1.3). Both
share the machine's 2 cores with moto, so only the ratio within one run means anything.

    python bench/credentials_aws.py                      # 3 rounds x 8 s, concurrency 8
    python bench/credentials_aws.py --smoke              # 1 round x 2 s
    python bench/credentials_aws.py --database postgresql://postgres@127.0.0.1:5432
    python bench/credentials_aws.py --loop asyncio       # both sides on asyncio's own loop

`--loop` (default uvloop, as `broker serve` runs) is the event loop of the broker process and
of this one, so the direct aioboto3 call and the broker run on the same kind of loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import broker_process  # noqa: E402  (needs the repository on sys.path)

ROLE_ARN = "arn:aws:iam::111111111111:role/binder-bench"


def run(main: Coroutine[Any, Any, int | None], loop: str) -> int | None:
    """Run `main` on a new event loop of the kind `loop` names ("uvloop" or "asyncio")."""
    if loop == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


@dataclass
class Run:
    label: str
    latencies: list[float]
    seconds: float
    errors: int

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    def pct(self, q: float) -> float:
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000 if data else float("nan")


async def load(label: str, call: Callable[[], Awaitable[bool]], conc: int, secs: float) -> Run:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + secs

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            start = time.perf_counter()
            ok = await call()
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    begun = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return Run(label, latencies, time.perf_counter() - begun, errors)


# --- the broker process ------------------------------------------------------------------


async def serve_broker(config_path: str, port: int, token_file: str) -> None:
    """`--serve` mode: the broker on `port`; writes a launch token for the bench user."""
    await broker_process.serve_broker(config_path, port, token_file, scope=("launch:aws",))


# --- the driver --------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    import aioboto3
    import aiohttp
    import tomli_w
    from botocore import UNSIGNED
    from botocore.config import Config

    from broker.devvault import DevVault, provision
    from broker.oauth.clients import hash_secret
    from tests.peers.moto import MotoServer, free_port

    work = Path(tempfile.mkdtemp(prefix="bench-aws-"))
    pg_name = f"broker_bench_aws_{os.getpid()}"
    if args.database == "sqlite":
        database = f"sqlite:///{work / 'broker.db'}"
    else:
        await _pg(args.database, [f'CREATE DATABASE "{pg_name}"'])
        database = f"{args.database.rstrip('/')}/{pg_name}"
    moto = await MotoServer.start()
    vault = await DevVault.start()
    broker: subprocess.Popen[bytes] | None = None
    try:
        approle = await provision(vault.address, vault.root_token)
        iam = moto.client("iam")
        trust = {"Version": "2012-10-17", "Statement": []}
        iam.create_role(RoleName="binder-bench", AssumeRolePolicyDocument=json.dumps(trust),
                        MaxSessionDuration=3600)  # fmt: skip
        port = free_port()
        public_url = f"http://127.0.0.1:{port}"
        settings = {
            "server": {"public_url": public_url, "cookie_secure": False},
            "vault": {"address": vault.address, "auth": {
                "method": "approle", "role_id": approle.role_id, "secret_id": approle.secret_id}},
            "database": {"url": database},
            "cache": {"url": "memory://"},
            "audit": {"path": str(work / "audit.log")},
            "upstreams": [],
            "clients": [{
                "client_id": "bench", "name": "Bench", "secret_hash": hash_secret("x" * 32),
                "grant_types": ["urn:ietf:params:oauth:grant-type:token-exchange"],
                "scopes": ["launch:aws"], "first_party": True}],
            "backends": [{"type": "aws", "id": "aws", "sts_endpoint": moto.endpoint,
                          "roles": [{"name": "bench", "arn": ROLE_ARN, "max_duration": 3600}]}],
        }  # fmt: skip
        config = work / "broker.toml"
        config.write_text(tomli_w.dumps(settings))
        token_file = work / "token"
        log = (work / "broker.log").open("wb")
        broker = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(config), str(port), str(token_file)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "BENCH_LOOP": args.loop},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not token_file.exists():
            if broker.poll() is not None or time.monotonic() > deadline:
                print((work / "broker.log").read_text()[-3000:], file=sys.stderr)
                return 3
            await asyncio.sleep(0.2)
        access = token_file.read_text()

        body = json.dumps({"backend": "aws", "duration": 900})
        headers = {"Authorization": f"Bearer {access}", "Content-Type": "application/json"}
        fake_token = "eyJ" + "a" * 600  # moto never looks at it; same size as the broker's
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            aioboto3.Session().client(
                "sts", region_name="us-east-1", endpoint_url=moto.endpoint,
                config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1},
                              max_pool_connections=args.concurrency),
            ) as sts,
        ):  # fmt: skip

            async def via_broker() -> bool:
                async with http.post(f"{public_url}/v1/credentials", data=body,
                                     headers=headers) as resp:  # fmt: skip
                    await resp.read()
                    return resp.status == 201

            async def direct() -> bool:
                await sts.assume_role_with_web_identity(
                    RoleArn=ROLE_ARN, RoleSessionName="u-0123456789abcdef0123456789abcdef",
                    WebIdentityToken=fake_token, DurationSeconds=900,
                )  # fmt: skip
                return True

            assert await via_broker(), "the broker did not issue a credential"
            await direct()
            runs: dict[str, list[Run]] = {"broker": [], "direct": []}
            for _ in range(args.rounds):
                for label, call in (("broker", via_broker), ("direct", direct)):
                    await load(label, call, args.concurrency, min(1.0, args.duration))  # warm
                    runs[label].append(await load(label, call, args.concurrency, args.duration))
        report(runs, args)
        return 0
    finally:
        if broker is not None and broker.poll() is None:
            broker.send_signal(signal.SIGTERM)
            try:
                broker.wait(10)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait()
        vault.stop()
        moto.stop()
        if args.database != "sqlite":
            await _pg(args.database, [f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'])


async def _pg(base: str, statements: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(base.rstrip("/") + "/postgres")
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def report(runs: dict[str, list[Run]], args: argparse.Namespace) -> None:
    def med(label: str, f: Callable[[Run], float]) -> float:
        return statistics.median(f(r) for r in runs[label])

    print("# POST /v1/credentials (aws) vs direct aioboto3 AssumeRoleWithWebIdentity, moto")
    print(
        f"# {platform.node()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, "
        f"{args.rounds} rounds x {args.duration}s, concurrency {args.concurrency}, "
        f"database {args.database.split('://')[0]}, event loop {args.loop} on both sides; medians"
    )
    print(f"{'target':8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for label in ("broker", "direct"):
        errors = sum(r.errors for r in runs[label])
        rps, p50 = med(label, lambda r: r.rps), med(label, lambda r: r.pct(0.5))
        p99 = med(label, lambda r: r.pct(0.99))
        print(f"{label:8} {rps:8.1f} {p50:8.2f} {p99:8.2f} {errors:7d}")
    p50 = med("broker", lambda r: r.pct(0.5)) / med("direct", lambda r: r.pct(0.5))
    p99 = med("broker", lambda r: r.pct(0.99)) / med("direct", lambda r: r.pct(0.99))
    rps = med("direct", lambda r: r.rps) / med("broker", lambda r: r.rps)
    verdict = "meets" if p50 <= 1.3 else "misses"
    print(f"ratio broker/direct: p50 {p50:.2f}x, p99 {p99:.2f}x, req/s {rps:.2f}x "
          f"({verdict} the 1.3x goal)")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        if os.environ.get("BENCH_PROFILE"):  # where the broker's time goes, for tuning
            import cProfile

            cProfile.run(
                "asyncio.run(serve_broker(sys.argv[2], int(sys.argv[3]), sys.argv[4]))",
                os.environ["BENCH_PROFILE"],
            )
        else:
            serving = serve_broker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
            run(serving, os.environ.get("BENCH_LOOP", "asyncio"))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--database", default="sqlite", help="sqlite, or a PostgreSQL server URL")
    parser.add_argument("--smoke", action="store_true", help="1 round x 2 s")
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop",
        help="event loop of the broker and of this process (the direct call)",
    )  # fmt: skip
    parsed = parser.parse_args()
    if parsed.smoke:
        parsed.rounds, parsed.duration = 1, 2.0
    sys.exit(run(main(parsed), parsed.loop))

"""Server CPU per request of the broker's `/oauth/token` (client_credentials) and
`/oauth/introspect`, next to the bare aiohttp baselines, for profiling work.

Wall-clock rates on a shared 2-core machine swing with whatever else runs; the CPU time the
server process spends per request (utime + stime from /proc, divided by the requests wrk
completed) moves far less, so a change to the broker's hot path shows up here first. One
broker process (`broker serve`, SQLite, memory cache, real OpenBao dev server) and the bare
peer are started; each target is loaded with wrk for `--duration` seconds, `--rounds` times.

    python bench/cpu_per_request.py [--rounds 3] [--duration 4] [--py-spy broker.svg]
    git archive BASE | tar -x -C /tmp/base
    python bench/cpu_per_request.py --compare /tmp/base   # before/after in one run

`--compare DIR` also starts the broker of another source tree (run as `python -m broker.cli`
with DIR first on the path), so two versions are measured in one run, rounds interleaved.
`--py-spy FILE` records this tree's broker with py-spy (installed by hand, not a project
dependency) during its runs and writes FILE (`--py-spy-format raw` for collapsed stacks,
`--py-spy-args=--gil` to sample only the thread holding the GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent))

from urllib.parse import urlencode

from token_endpoint import (
    AUDIENCE,
    BARE,
    BROKER,
    CC_BODY,
    CLIENT_ID,
    EXCHANGE_GRANT,
    FORM,
    LUA,
    SCOPE,
    Processes,
    _wait_port,
    basic,
    cpu_seconds,
    free_port,
    http,
    probe_token,
    rss_mb,
    wait_http,
)

from broker.devvault import DevVault, provision
from broker.oauth.clients import hash_secret


def main_thread_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(port: int, path: str, body: str, headers: list[str], pid: int, seconds: int,
            connections: int) -> tuple[float, float, float, float]:  # fmt: skip
    """(requests/s, CPU µs per request, p99 ms, main thread's share of the CPU)."""
    env = {**os.environ, "WRK_METHOD": "POST", "WRK_BODY": body,
           "WRK_HEADERS": "\n".join(headers), "WRK_PORTS": ""}  # fmt: skip
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
            "-s", str(LUA), f"http://127.0.0.1:{port}{path}"]  # fmt: skip
    before, main_before = cpu_seconds([pid]), main_thread_seconds(pid)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    cpu = cpu_seconds([pid]) - before
    main = main_thread_seconds(pid) - main_before
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("WRK_RESULT "))
    r = json.loads(line.removeprefix("WRK_RESULT "))
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    if errors:
        raise RuntimeError(f"{errors} errors on {path}")
    rps = r["requests"] / (r["duration_us"] / 1e6)
    return rps, cpu / r["requests"] * 1e6, r["p99_us"] / 1e3, main / cpu if cpu else 0.0


def start_broker(
    procs: Processes, work: Path, vault: DevVault, role_id: str, secret: str, name: str,
    source: Path | None,
) -> tuple[int, int]:  # fmt: skip
    """(port, pid) of one `broker serve` on SQLite; `source`: run the broker package found
    in that source tree instead of the installed one (before/after comparisons)."""
    port = free_port()
    config = {
        "server": {"public_url": f"http://127.0.0.1:{port}", "bind_port": port,
                   "cookie_secure": False},
        "vault": {"address": vault.address, "auth": {"method": "approle",
                  "role_id": role_id, "secret_id": {"file": str(work / "sid")}}},
        "database": {"url": f"sqlite:///{work / f'{name}.db'}"},
        "cache": {"url": "memory://"},
        "audit": {"path": str(work / f"audit-{name}.log"), "chain": name},
        "clients": [{
            "client_id": CLIENT_ID, "auth_method": "client_secret_basic",
            "secret_hash": hash_secret(secret),
            "grant_types": ["client_credentials", EXCHANGE_GRANT],
            "scopes": [SCOPE], "audiences": [AUDIENCE],
        }],
    }  # fmt: skip
    path = work / f"{name}.toml"
    path.write_text(tomli_w.dumps(config))
    argv = [BROKER] if source is None else [sys.executable, "-m", "broker.cli"]
    env = None if source is None else {"PYTHONPATH": str(source)}
    subprocess.run([*argv, "db", "upgrade", "--config", str(path)], check=True,
                   capture_output=True, env={**os.environ, **(env or {})}, cwd=source)  # fmt: skip
    process = procs.start(name, [*argv, "serve", "--config", str(path)], env, source)
    wait_http(f"http://127.0.0.1:{port}/readyz", process, name)
    return port, process.pid


def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="broker-cpu-"))
    procs = Processes(work)
    vault = asyncio.run(DevVault.start(log_path=work / "devvault.log"))
    try:
        auth = asyncio.run(provision(vault.address, vault.root_token))
        (work / "sid").write_text(auth.secret_id)
        (work / "sid").chmod(0o600)
        secret = secrets.token_urlsafe(24)
        brokers = {"broker": start_broker(procs, work, vault, auth.role_id, secret, "broker", None)}
        if args.compare:
            brokers["other"] = start_broker(
                procs, work, vault, auth.role_id, secret, "other", Path(args.compare)
            )
        bare_port = free_port()
        bare = procs.start(
            "bare", [sys.executable, str(BARE), str(bare_port), CLIENT_ID, "http://127.0.0.1"],
            {"BENCH_CLIENT_SECRET": secret},
        )  # fmt: skip
        _wait_port(bare_port, bare)
        time.sleep(2)
        for name, (_, pid) in brokers.items():
            print(f"idle RSS: {name} {rss_mb(pid):.1f} MB")
        print(f"idle RSS: bare {rss_mb(bare.pid):.1f} MB")
        authz = basic(CLIENT_ID, secret)
        headers = [FORM, f"Authorization: {authz}"]
        targets = []
        for name, (port, pid) in brokers.items():
            status, answer = probe_token(port, authz, CC_BODY)
            assert status == 200, answer
            intro = urlencode({"token": answer["access_token"], "token_type_hint": "access_token"})
            targets += [
                (f"{name} token", port, "/oauth/token", CC_BODY, pid),
                (f"{name} introspect", port, "/oauth/introspect", intro, pid),
            ]
        _, raw = http(
            "POST",
            f"http://127.0.0.1:{bare_port}/token",
            body=CC_BODY.encode(),
            headers={"Authorization": authz, "Content-Type": FORM.split(": ")[1]},
        )
        bare_intro = urlencode({"token": json.loads(raw)["access_token"],
                                "token_type_hint": "access_token"})  # fmt: skip
        targets += [
            ("bare token", bare_port, "/token", CC_BODY, bare.pid),
            ("bare verify", bare_port, "/introspect", bare_intro, bare.pid),
        ]
        if args.only:
            targets = [t for t in targets if t[0] in args.only]
        for _, p, route, body, pid in targets:  # warm-up
            run_wrk(p, route, body, headers, pid, 1, args.connections)
        spy = None
        if args.py_spy:
            spy_argv = [
                "py-spy",
                "record",
                "-p",
                str(brokers["broker"][1]),
                "-o",
                args.py_spy,
                "-r",
                "250",
                "--nonblocking",
                "-f",
                args.py_spy_format,
                *args.py_spy_args,
            ]
            spy = subprocess.Popen(spy_argv, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1)
        results: dict[str, list[tuple[float, float, float, float]]] = {}
        for _ in range(args.rounds):
            for name, p, route, body, pid in targets:
                if spy is not None and not name.startswith("broker "):
                    continue
                results.setdefault(name, []).append(
                    run_wrk(p, route, body, headers, pid, args.duration, args.connections)
                )
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        print(f"c={args.connections}, {args.rounds} x {args.duration} s, medians")
        print(f"{'target':20} {'req/s':>8} {'CPU us/req':>11} {'p99 ms':>8} {'main thread':>12}")
        for name, runs in results.items():
            rps = statistics.median(r[0] for r in runs)
            us = statistics.median(r[1] for r in runs)
            p99 = statistics.median(r[2] for r in runs)
            main = statistics.median(r[3] for r in runs)
            print(f"{name:20} {rps:8.0f} {us:11.0f} {p99:8.1f} {main:12.0%}")
        for name, (_, pid) in brokers.items():
            print(f"RSS after load: {name} {rss_mb(pid):.1f} MB")
        if args.keep:
            print(f"kept {work}")
    finally:
        procs.stop_all()
        vault.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--py-spy", default="", help="flame graph file for the broker runs")
    parser.add_argument("--py-spy-format", default="flamegraph", help="py-spy output format")
    parser.add_argument("--only", nargs="*", default=[], help="target names to run")
    parser.add_argument("--py-spy-args", nargs="*", default=[], help="more py-spy options")
    parser.add_argument("--compare", default="", help="also run the broker of this source tree")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    sys.exit(main(parser.parse_args()))

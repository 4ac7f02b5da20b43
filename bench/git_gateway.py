"""Benchmark of the git gateway: `git clone` through the broker against `git clone` directly
from the same `git http-backend`, in the same run.

What runs on 127.0.0.1 (all stopped by PID at the end):
- the git peer of `tests/peers/git_http.py` in its own process: `git http-backend` (CGI)
  behind HTTP Basic, serving two generated bare repositories of random (incompressible)
  blobs, ~50 MB in 5 commits and ~200 MB in 4 commits;
- an OpenBao dev server (the broker's keys and the upstream secret live there);
- the broker in its own process (`--serve` mode of this script: started services, SQLite,
  audit log, one generic `git` backend in front of the peer, a site policy letting the bench
  user read), served with aiohttp;
- this process: runs `git clone --bare` (so checkout does not blur the transfer) directly
  from the peer (credential in the URL) and through the gateway (a broker token in
  `http.extraHeader`), interleaved, and samples the broker's RSS from /proc while the
  ~200 MB repository goes through it.

Goals: throughput through the gateway >= 0.8x direct; the broker's RSS grows < 20 MB during
the ~200 MB transfer (it streams in 64 KiB chunks). Both paths share the 2 cores with the
peer, its CGI and git's index-pack, so only ratios within one run mean anything.

    python bench/git_gateway.py              # ~50 MB and ~200 MB repos, 3 rounds, medians
    python bench/git_gateway.py --smoke      # one ~4 MB repo, 1 round (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import broker_process  # noqa: E402  (needs the repository on sys.path)

if TYPE_CHECKING:
    from broker.services import Services

OWNER = "bench"
SITE_POLICY = """
@id("bench-reads-bench-repos")
permit (principal, action == Action::"read_repo", resource)
when { resource.namespace == "bench" };
"""
MB = 1 << 20


# --- the broker process ------------------------------------------------------------------


async def serve_broker(config_path: str, port: int, token_file: str) -> None:
    """`--serve` mode: the broker on `port`, the upstream secret stored for the `bench`
    organisation; writes a repo:read token for the bench user."""

    async def store_upstream_secret(svc: Services) -> None:
        from adapters.downstream.git_host import org_secret_path

        await svc.vault.kv_write(
            org_secret_path(svc.settings.vault.prefix, "campus", OWNER),
            {"username": os.environ["BENCH_UPSTREAM_USER"],
             "password": os.environ.pop("BENCH_UPSTREAM_PASSWORD")},
        )  # fmt: skip

    await broker_process.serve_broker(
        config_path, port, token_file, scope=("repo:read",), ttl=3600,
        prepare=store_upstream_secret,
    )  # fmt: skip


# --- measuring ---------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RssSampler:
    """Peak RSS of one process, sampled every 10 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            self._stop.wait(0.01)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Timings:
    seconds: dict[str, list[float]] = field(default_factory=lambda: {"direct": [], "gateway": []})
    size: int = 0  # bytes of the cloned pack

    def median(self, label: str) -> float:
        return statistics.median(self.seconds[label])

    def throughput(self, label: str) -> float:
        return self.size / self.median(label) / MB


async def clone(url: str, dest: Path, env: dict[str, str], *extra: str) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "git", *extra, "clone", "--bare", "--quiet", url, str(dest), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"git clone failed: {err.decode()[-500:]}")
    return elapsed


def pack_size(dest: Path) -> int:
    return sum(p.stat().st_size for p in (dest / "objects" / "pack").glob("*.pack"))


# --- the driver --------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    import tomli_w

    from broker.devvault import DevVault, provision
    from tests.peers.git_http import free_port, make_repo, start_peer

    work = Path(tempfile.mkdtemp(prefix="bench-git-"))
    peer = start_peer(work / "repos")
    vault = await DevVault.start()
    broker: subprocess.Popen[bytes] | None = None
    try:
        sizes = {"r4": (2, 2 * MB)} if args.smoke else {"r50": (5, 10 * MB), "r200": (4, 50 * MB)}
        for name, (commits, blob) in {"warm": (1, 64 * 1024), **sizes}.items():
            make_repo(peer.root, OWNER, name, commits=commits, blob_bytes=blob)
        approle = await provision(vault.address, vault.root_token)
        policies = work / "policies"
        policies.mkdir()
        (policies / "site.cedar").write_text(SITE_POLICY)
        schema = REPO / "policies" / "broker.cedarschema"
        (policies / schema.name).write_text(schema.read_text())
        port = free_port()
        public_url = f"http://127.0.0.1:{port}"
        settings = {
            "server": {"public_url": public_url, "cookie_secure": False},
            "vault": {"address": vault.address, "auth": {
                "method": "approle", "role_id": approle.role_id, "secret_id": approle.secret_id}},
            "database": {"url": f"sqlite:///{work / 'broker.db'}"},
            "cache": {"url": "memory://"},
            "audit": {"path": str(work / "audit.log")},
            "upstreams": [],
            "policy": {"directory": str(policies)},
            "backends": [{"type": "git", "id": "campus", "url": peer.url}],
        }  # fmt: skip
        config = work / "broker.toml"
        config.write_text(tomli_w.dumps(settings))
        token_file = work / "token"
        log = (work / "broker.log").open("wb")
        broker = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(config), str(port), str(token_file)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "BENCH_UPSTREAM_USER": peer.username,
                 "BENCH_UPSTREAM_PASSWORD": peer.password},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not token_file.exists():
            if broker.poll() is not None or time.monotonic() > deadline:
                print((work / "broker.log").read_text()[-3000:], file=sys.stderr)
                return 3
            time.sleep(0.2)
        token = token_file.read_text()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work),
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_TERMINAL_PROMPT": "0",
        }  # fmt: skip
        header = ("-c", f"http.extraHeader=Authorization: Bearer {token}")

        def gateway_url(name: str) -> str:
            return f"{public_url}/git/campus/{OWNER}/{name}.git"

        dest = work / "clone.git"
        # Warm both paths (the broker's first use reads the upstream secret from Vault).
        await clone(gateway_url("warm"), dest, env, *header)
        await clone(peer.remote_url(OWNER, "warm", with_password=True), dest, env)
        results: dict[str, Timings] = {}
        rss: dict[str, tuple[int, int]] = {}
        for name in sizes:
            timings = results[name] = Timings()
            for _ in range(args.rounds):
                timings.seconds["direct"].append(
                    await clone(peer.remote_url(OWNER, name, with_password=True), dest, env)
                )
                timings.size = pack_size(dest)
                before = rss_kib(broker.pid)
                with RssSampler(broker.pid) as sampler:
                    elapsed = await clone(gateway_url(name), dest, env, *header)
                timings.seconds["gateway"].append(elapsed)
                previous = rss.get(name, (before, 0))
                rss[name] = (min(previous[0], before), max(previous[1], sampler.peak - before))
                if pack_size(dest) != timings.size:
                    raise RuntimeError("the two clones differ in size")
        report(results, rss, args)
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
        peer.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(
    results: dict[str, Timings], rss: dict[str, tuple[int, int]], args: argparse.Namespace
) -> None:
    print("# git clone --bare through the broker's git gateway vs directly from git http-backend")
    print(
        f"# {platform.node()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{args.rounds} round(s), medians"
    )
    print(
        f"{'repo':6} {'pack MB':>8} {'direct s':>9} {'gateway s':>10} {'direct MB/s':>12} "
        f"{'gateway MB/s':>13} {'ratio':>6} {'RSS base MB':>12} {'RSS growth MB':>14}"
    )
    for name, t in results.items():
        ratio = t.throughput("gateway") / t.throughput("direct")
        base, growth = rss[name]
        print(
            f"{name:6} {t.size / MB:8.1f} {t.median('direct'):9.2f} {t.median('gateway'):10.2f} "
            f"{t.throughput('direct'):12.1f} {t.throughput('gateway'):13.1f} {ratio:6.2f} "
            f"{base / 1024:12.1f} {growth / 1024:14.1f}"
        )
    ratios = [r.throughput("gateway") / r.throughput("direct") for r in results.values()]
    worst_ratio = min(ratios)
    biggest = max(results, key=lambda n: results[n].size)
    growth_mb = rss[biggest][1] / 1024
    print(
        f"throughput gateway/direct: {worst_ratio:.2f}x at worst "
        f"({'meets' if worst_ratio >= 0.8 else 'misses'} the 0.8x goal); "
        f"broker RSS growth during {biggest}: {growth_mb:.1f} MB "
        f"({'meets' if growth_mb < 20 else 'misses'} the 20 MB goal)"
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        asyncio.run(serve_broker(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one ~4 MB repo, 1 round")
    parsed = parser.parse_args()
    if parsed.smoke:
        parsed.rounds = 1
    sys.exit(asyncio.run(main(parsed)))

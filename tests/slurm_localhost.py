"""A single-node SLURM cluster on localhost, for the profile's end-to-end test.

Needs root and the Debian packages ``slurmctld slurmd slurm-client munge`` (``.ci/run`` installs
them). :class:`LocalSlurm` writes a ``slurm.conf`` with two partitions named as in
``profiles/slurm`` (``cpu`` default, ``gpu``; the node has no GPU, so the test overlay asks for
none), starts munged (unless one already answers), slurmctld and slurmd, waits until the node
is idle, and stops exactly the daemons it started, by their pids. Accounting is off, so ``sacct``
cannot report job states: clients must use ``squeue``, and ``MinJobAge`` keeps finished jobs
visible to it.

Run by hand to debug: ``python tests/slurm_localhost.py /tmp/cluster`` starts one and waits.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "srun")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
MUNGE_SOCKET_DIR = Path("/run/munge")
MUNGE_LOG = Path("/var/log/munge/munged.log")


class ClusterError(RuntimeError):
    """The cluster could not start; the message holds the daemon logs."""


def missing_requirements() -> list[str]:
    """Why a cluster cannot be started here (empty when it can)."""
    missing = [
        f"{name} not on PATH"
        for name in DAEMONS + CLIENTS
        if shutil.which(name) is None and not Path("/usr/sbin", name).exists()
    ]
    if os.geteuid() != 0:
        missing.append("not root (slurmd must run as root)")
    return missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    found = shutil.which(name) or str(Path("/usr/sbin", name))
    return found


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ClusterError("cannot read MemTotal from /proc/meminfo")


class LocalSlurm:
    """Start with :meth:`start`, stop with :meth:`stop` (or use as a context manager)."""

    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.started: dict[str, Path] = {}  # daemon -> its pid file
        self._saved_system_conf: bytes | None = None
        self._wrote_system_conf = False

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        missing = missing_requirements()
        if missing:
            raise ClusterError("cannot start a SLURM cluster here: " + "; ".join(missing))
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._slurm_conf())
        self._install_system_conf()
        try:
            self._start_munge()
            self._run([_binary("slurmctld"), "-f", str(self.conf)], "slurmctld")
            self._run([_binary("slurmd"), "-f", str(self.conf), "-N", "localhost"], "slurmd")
            self._wait_idle(timeout)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the daemons this object started (slurmd, slurmctld, munged), newest first."""
        for name in reversed(list(self.started)):
            pid = self._pid(self.started[name])
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.started.clear()
        if self._wrote_system_conf:
            if self._saved_system_conf is None:
                SYSTEM_CONF.unlink(missing_ok=True)
            else:
                SYSTEM_CONF.write_bytes(self._saved_system_conf)
            self._wrote_system_conf = False

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (sbatch, squeue) and snakemake: this cluster's config."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def logs(self, tail: int = 60) -> str:
        parts = []
        logs = sorted((self.root / "log").glob("*.log"))
        if "munged" in self.started:
            logs.append(MUNGE_LOG)
        for log in logs:
            if not log.exists():
                continue
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"== {log} ==\n" + "\n".join(lines))
        return "\n".join(parts) or f"(no daemon logs under {self.root / 'log'})"

    # -- parts ---------------------------------------------------------------------------------
    def _slurm_conf(self) -> str:
        memory = _memory_mb() - 512
        log = self.root / "log"
        return "\n".join(
            [
                "ClusterName=comtiptest",
                "SlurmctldHost=localhost",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "SlurmUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                "ProctrackType=proctrack/linuxproc",  # no cgroups in containers
                "TaskPlugin=task/none",
                "MpiDefault=none",
                "SchedulerType=sched/backfill",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                f"StateSaveLocation={self.root / 'state'}",
                f"SlurmdSpoolDir={self.root / 'spool'}",
                f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                f"SlurmctldLogFile={log / 'slurmctld.log'}",
                f"SlurmdLogFile={log / 'slurmd.log'}",
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                "AccountingStorageType=accounting_storage/none",
                "JobAcctGatherType=jobacct_gather/none",
                "JobCompType=jobcomp/none",
                "MinJobAge=86400",  # finished jobs stay visible to squeue (no sacct without accounting)
                "ReturnToService=2",
                f"NodeName=localhost NodeHostname=localhost CPUs={self.cpus} RealMemory={memory} State=UNKNOWN",
                "PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                "PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP",
                "",
            ]
        )

    def _install_system_conf(self) -> None:
        """``srun`` inside a job step reads /etc/slurm/slurm.conf: put ours there, restore later."""
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        if SYSTEM_CONF.exists():
            self._saved_system_conf = SYSTEM_CONF.read_bytes()
        shutil.copyfile(self.conf, SYSTEM_CONF)
        self._wrote_system_conf = True

    def _start_munge(self) -> None:
        if _munge_answers():
            return  # a munged is already serving the default socket: use it, do not own it
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        MUNGE_SOCKET_DIR.chmod(0o755)  # munged refuses a group/world-writable socket dir
        pid_file = MUNGE_SOCKET_DIR / "munged.pid"
        pid_file.unlink(missing_ok=True)
        # munged runs as user munge, which cannot enter a root-only temp folder: it logs to
        # munge's own log folder (/var/log/munge), which logs() includes
        self._run(
            ["runuser", "-u", "munge", "--", _binary("munged"), f"--pid-file={pid_file}"], "munged", pid_file=pid_file
        )
        deadline = time.monotonic() + 10
        while not _munge_answers():
            if time.monotonic() > deadline:
                raise ClusterError("munged started but does not answer\n" + self.logs())
            time.sleep(0.2)

    def _run(self, command: list[str], name: str, pid_file: Path | None = None) -> None:
        """Start a daemon (it forks into the background) and remember its pid file."""
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise ClusterError(f"{name} failed to start ({result.returncode}): {result.stderr.strip()}\n{self.logs()}")
        pid_file = pid_file or self.root / f"{name}.pid"
        deadline = time.monotonic() + 10
        while self._pid(pid_file) is None:
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} wrote no pid file {pid_file}\n{self.logs()}")
            time.sleep(0.1)
        self.started[name] = pid_file

    @staticmethod
    def _pid(pid_file: Path) -> int | None:
        try:
            return int(pid_file.read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            result = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env, timeout=30
            )
            last = (result.stdout + result.stderr).strip()
            if (
                result.returncode == 0
                and last.startswith("localhost")
                and all(line.split()[1] in ("idle", "mix", "alloc") for line in last.splitlines())
            ):
                return
            time.sleep(0.5)
        raise ClusterError(f"the node did not become idle in {timeout:.0f} s (sinfo: {last!r})\n{self.logs()}")


def _munge_answers() -> bool:
    try:
        encoded = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if encoded.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True, timeout=10).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as stopped
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


if __name__ == "__main__":
    cluster = LocalSlurm(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/comtip-slurm"))
    cluster.start()
    print(f"cluster up; export SLURM_CONF={cluster.conf}; Ctrl-C stops it")
    try:
        signal.pause()
    finally:
        cluster.stop()

"""A real single-node Slurm cluster for the `slurm` test tier: Debian's slurm-wlm + munge, no systemd.

`LocalSlurm(base).start()` installs the packages when missing (apt), then starts a private munged (own
key and socket under `base`), slurmctld and slurmd. The Slurm daemons run inside a private network
namespace that holds only a loopback device, bind 127.0.0.1 only (`NoInAddrAny`), and read their own
slurm.conf (`-f`; clients get `SLURM_CONF`), so nothing in /etc/slurm is touched and two sessions can run
side by side. Job payloads that bind the wildcard address (torch's TCPStore) are still reachable from
loopback only. `stop()` cancels the jobs, stops the daemons by their saved PIDs (checking
/proc/PID/comm first) and then whatever is left in the namespace, and deletes the namespace.

Why each setting is there: ../shared/notes/slurm_local.md (measured on this kind of machine).
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge")


class SlurmUnavailable(RuntimeError):
    """The machine cannot host the test cluster (not root, no apt, no namespaces); the tests skip."""


def _run(cmd: list[str], *, timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def missing_packages() -> list[str]:
    missing = []
    for pkg in PACKAGES:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if "install ok installed" not in out.stdout:
            missing.append(pkg)
    return missing


def install_packages(missing: list[str]) -> float:
    """apt-get install the packages without starting their services; return the seconds it took."""
    t0 = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # postinst would start the daemons through invoke-rc.d; policy-rc.d exit 101 forbids that.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            if proc.returncode != 0:
                raise SlurmUnavailable(f"'{' '.join(cmd)}' failed: {proc.stderr.strip()[-500:]}")
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    return time.monotonic() - t0


def check_machine() -> None:
    """Raise SlurmUnavailable naming what is missing."""
    if platform.system() != "Linux":
        raise SlurmUnavailable("needs Linux")
    if os.geteuid() != 0:
        raise SlurmUnavailable("needs root (apt-get, network namespaces, daemons)")
    for tool in ("ip", "nsenter", "runuser", "dpkg-query"):
        if shutil.which(tool) is None:
            raise SlurmUnavailable(f"'{tool}' not found")
    if missing_packages() and shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm/munge are not installed and apt-get is not available")


NAME_PREFIX = "m2slurm-"


class LocalSlurm:
    """One cluster per test session, named after the session's PID: <tmp>/m2slurm-PID and netns m2slurm-PID."""

    def __init__(self, *, pid: int | None = None, cpus: int = 16, mem_mb: int = 16384):
        self.pid = os.getpid() if pid is None else pid
        self.base = Path(tempfile.gettempdir()) / f"{NAME_PREFIX}{self.pid}"
        self.netns = f"{NAME_PREFIX}{self.pid}"
        self.cpus, self.mem_mb = cpus, mem_mb
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.base / "etc" / "slurm.conf"
        self.munge_socket = self.base / "munge" / "run" / "munge.socket.2"
        self.timings: dict[str, float] = {}
        self._netns_made = Path(f"/run/netns/{self.netns}").exists()

    # ------------------------------------------------------------------ clients
    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (and, through sbatch's --export=ALL, for the jobs)."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def prefix(self) -> list[str]:
        """Run a command inside the cluster's network namespace (nsenter: `ip netns exec` hides cgroups)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--"]

    def run(self, *cmd: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return _run(self.prefix() + list(cmd), timeout=timeout, check=check, env=self.env, **kw)

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Install if needed and start munged, slurmctld and slurmd; raise SlurmUnavailable or RuntimeError."""
        check_machine()
        missing = missing_packages()
        self.timings["apt_install_s"] = install_packages(missing) if missing else 0.0
        t0 = time.monotonic()
        addr = socket.gethostbyname(self.node)
        if not addr.startswith("127."):
            raise SlurmUnavailable(f"host name {self.node} resolves to {addr}, not to loopback")
        self._make_dirs()
        self._make_netns()
        self._write_conf()
        self._start_munged()
        self.run("/usr/sbin/slurmctld", "-f", str(self.conf))
        self._wait("slurmctld answers", lambda: "is UP" in self.run("scontrol", "ping", check=False).stdout)
        self.run("/usr/sbin/slurmd", "-f", str(self.conf), "-N", self.node)
        self._wait("node idle", lambda: self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
                   == "idle")
        self._check_loopback_only()
        self.timings["daemons_up_s"] = time.monotonic() - t0

    def _make_dirs(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
        for sub in ("etc", "state/ctld", "state/d", "log", "run", "munge/etc", "munge/run", "munge/log",
                    "munge/lib"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket whose directory or any parent is not world-executable.
        for d in (self.base, self.base / "munge", self.base / "munge" / "run"):
            d.chmod(0o755)
        _run(["chown", "-R", "munge:munge", str(self.base / "munge")])
        for sub in ("etc", "log", "lib"):
            (self.base / "munge" / sub).chmod(0o700)

    def _make_netns(self) -> None:
        proc = _run(["ip", "netns", "add", self.netns], check=False)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"cannot create a network namespace: {proc.stderr.strip()}")
        self._netns_made = True
        _run(self.prefix() + ["ip", "link", "set", "lo", "up"])
        # glibc's getaddrinfo(AI_ADDRCONFIG) treats IPv4 as absent when 127.0.0.1 is the only address.
        _run(self.prefix() + ["ip", "addr", "add", "127.0.0.2/8", "dev", "lo"])

    def _write_conf(self) -> None:
        b = self.base
        lines = [
            "ClusterName=m2test", "SlurmctldHost=localhost", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire is also the hold before a requeued job may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={b}/state/ctld", f"SlurmdSpoolDir={b}/state/d/%n",
            f"SlurmctldPidFile={b}/run/slurmctld.pid", f"SlurmdPidFile={b}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log", f"SlurmdLogFile={b}/log/slurmd-%n.log",
            "SlurmctldPort=6817", "SlurmdPort=6818", "SrunPortRange=60001-60999",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",  # bind 127.0.0.1, not INADDR_ANY
            "MailProg=/bin/true", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={b}/log/jobcomp.txt", "MpiDefault=none",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=5,bf_interval=5",
            "DependencyParameters=kill_invalid_depend",  # not a SchedulerParameters option in 22.05
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",  # advertise more CPUs than the VM has
            "ReturnToService=2", "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=5",
            "MinJobAge=3600", "Waittime=0",  # finished jobs stay visible to scontrol for the whole session
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            f"NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} Port=6818 CPUs={self.cpus} "
            f"RealMemory={self.mem_mb} State=UNKNOWN",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munged(self) -> None:
        m = self.base / "munge"
        key = m / "etc" / "munge.key"
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/mungekey", "--create", f"--keyfile={key}"])
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={self.munge_socket}",
              f"--key-file={key}", f"--pid-file={m}/run/munged.pid", f"--log-file={m}/log/munged.log",
              f"--seed-file={m}/lib/munged.seed"])

        def round_trip() -> bool:
            cred = _run(["munge", "-S", str(self.munge_socket), "-n"], check=False)
            return cred.returncode == 0 and _run(["unmunge", "-S", str(self.munge_socket)], input=cred.stdout,
                                                 check=False).returncode == 0
        self._wait("munge round trip", round_trip)

    def _wait(self, what: str, ready, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"local Slurm: {what} not reached within {timeout:.0f} s\n{self.log_tails()}")
            time.sleep(0.2)

    def _check_loopback_only(self) -> None:
        out = self.run("ss", "-ltnpH").stdout.splitlines()
        bad = [line for line in out if ("slurm" in line or "munge" in line) and not line.split()[3].startswith("127.")]
        if bad:
            raise RuntimeError(f"local Slurm: a daemon listens beyond loopback: {bad}")

    def log_tails(self, lines: int = 20) -> str:
        parts = []
        for path in sorted((self.base / "log").glob("slurm*.log")):
            parts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Tear down whatever was started, by saved PIDs; safe on a half-started cluster."""
        if self._alive(self.base / "run" / "slurmctld.pid", "slurmctld"):
            # slurmstepd and job processes outlive slurmd: cancel the jobs while slurmctld is up.
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30
                while self.run("squeue", "-h", "-o", "%A", check=False).stdout.strip():
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
        for pidfile in sorted((self.base / "run").glob("slurmd-*.pid")):
            _stop_pid(pidfile, "slurmd")
        _stop_pid(self.base / "run" / "slurmctld.pid", "slurmctld")
        _stop_pid(self.base / "munge" / "run" / "munged.pid", "munged")
        if self._netns_made:
            self._kill_netns_leftovers()
            _run(["ip", "netns", "del", self.netns], check=False)
            self._netns_made = False

    def _kill_netns_leftovers(self) -> None:
        # Everything still inside the private namespace was started by this cluster.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = _run(["ip", "netns", "pids", self.netns], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), sig)
                except ProcessLookupError:
                    pass
            if pids:
                time.sleep(2 if sig == signal.SIGTERM else 0.5)

    @staticmethod
    def _alive(pidfile: Path, comm: str) -> bool:
        try:
            pid = int(pidfile.read_text())
            return Path(f"/proc/{pid}/comm").read_text().strip() == comm
        except (OSError, ValueError):
            return False


def _stop_pid(pidfile: Path, comm: str, timeout: float = 20) -> None:
    """TERM the PID saved in `pidfile` if it is still `comm` (not a reused PID), KILL after `timeout`."""
    if not LocalSlurm._alive(pidfile, comm):
        return
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)


def reap_stale_clusters() -> list[str]:
    """Stop the clusters of test sessions that died without their teardown (killed by SIGKILL, say)."""
    reaped = []
    netns_dir = Path("/run/netns")
    for path in sorted(netns_dir.glob(f"{NAME_PREFIX}*")) if netns_dir.is_dir() else []:
        pid = path.name[len(NAME_PREFIX):]
        if not pid.isdigit() or int(pid) == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        stale = LocalSlurm(pid=int(pid))
        stale.stop()
        shutil.rmtree(stale.base, ignore_errors=True)
        reaped.append(path.name)
    return reaped

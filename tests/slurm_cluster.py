"""A real single-node SLURM cluster (munged, slurmctld, slurmd) started on this machine for tests.

``LocalSlurmCluster(workdir)`` writes a slurm.conf into ``workdir``, starts the three daemons in
the foreground as child processes of the test run and stops them again on exit. SLURM commands
reach it through ``cluster.env`` (``SLURM_CONF`` points at the generated slurm.conf), so nothing
under /etc is read or changed. There is no accounting (``sacct`` does not work): job states come
from ``scontrol show job``, and ``MinJobAge`` keeps finished jobs visible there for an hour.

Two things live outside ``workdir``, in a private ``/tmp/kinoe-slurm-*`` folder: the MUNGE socket
(munged refuses a socket whose parent folders are not searchable by everyone, which pytest's
0700 temporary folders are not) and slurmd's spool folder (it holds Unix sockets, whose paths may
not exceed 107 bytes). That folder also holds a lock that the owning process keeps; a later
cluster kills the processes of a folder whose owner died (found by the ``KINOE_SLURM_CLUSTER``
variable in their environment) and removes it, so a crashed run leaves nothing behind for long.

Needs root: slurmd launches jobs as their submitting user, and the daemons run as root.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

#: Commands a cluster needs: the daemons, and the clients that tests and datatrove call.
REQUIRED_COMMANDS = (
    "munged",
    "munge",
    "unmunge",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "squeue",
    "sinfo",
    "scontrol",
    "scancel",
)

#: States (as ``scontrol show job`` spells them) that a job never leaves.
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
    }
)

PARTITION = "debug"
MARKER_VARIABLE = "KINOE_SLURM_CLUSTER"
RUNTIME_PREFIX = "kinoe-slurm-"
RUNTIME_PARENT = Path("/tmp")
# Ports below Linux's ephemeral range (32768-60999), so outgoing connections never hold them.
PORT_RANGE = (20000, 32000)
# Environment prefixes that would make sbatch/srun act as if inside another job or cluster.
_FOREIGN_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_")


class SlurmClusterError(RuntimeError):
    """The local cluster could not be started, or a SLURM command failed."""


def slurm_available() -> str | None:
    """None when a local cluster can be started here, else the reason it cannot."""
    missing = [name for name in REQUIRED_COMMANDS if _which(name) is None]
    if missing:
        return (
            f"SLURM is not installed (missing {', '.join(missing)}); "
            "install it with 'apt-get install slurm-wlm munge' (.ci/run does, as root)"
        )
    if os.geteuid() != 0:
        return (
            "a local SLURM cluster must run as root (slurmd starts jobs as their submitting user)"
        )
    return None


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def _command(name: str) -> str:
    path = _which(name)
    if path is None:
        raise SlurmClusterError(f"{name} not found: {slurm_available()}")
    return path


def _clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}


def _free_port(exclude: Sequence[int] = ()) -> int:
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*PORT_RANGE)
        if port in exclude:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise SlurmClusterError(f"no free TCP port in {PORT_RANGE}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as error:
        return f"(cannot read: {error})"
    return "\n".join(text[-lines:]) if text else "(empty)"


def _ancestors() -> set[int]:
    """This process and its parents: never killed by a sweep, even when they carry a marker."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def _marked_processes(runtime_dir: str) -> list[int]:
    """Processes whose environment holds this cluster's marker: daemons, slurmstepd, jobs."""
    entry = f"\0{MARKER_VARIABLE}={runtime_dir}\0".encode()
    spared = _ancestors()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in spared:
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if entry in b"\0" + environ + b"\0":
            found.append(int(proc.name))
    return found


def _kill_marked(runtime_dir: str, grace: float = 3.0) -> None:
    """SIGTERM the marked processes, SIGKILL those still there after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    sent_kill = 0
    sig = signal.SIGTERM
    while sent_kill < 5:
        pids = _marked_processes(runtime_dir)
        if not pids:
            return
        if sig == signal.SIGTERM and time.monotonic() > deadline:
            sig = signal.SIGKILL
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if sig == signal.SIGKILL:
            sent_kill += 1
        time.sleep(0.2)


def cleanup_stale_clusters() -> list[Path]:
    """Kill the processes and remove the folders of clusters whose owning process is gone."""
    removed = []
    for runtime_dir in sorted(RUNTIME_PARENT.glob(f"{RUNTIME_PREFIX}*")):
        lock_path = runtime_dir / "owner.lock"
        if not runtime_dir.is_dir() or runtime_dir.is_symlink():
            continue
        try:
            lock = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            lock = None  # died before taking the lock
        except OSError:
            continue
        try:
            if lock is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live cluster
            _kill_marked(str(runtime_dir))
            shutil.rmtree(runtime_dir, ignore_errors=True)
            removed.append(runtime_dir)
        finally:
            if lock is not None:
                os.close(lock)
    return removed


def _node_hardware() -> dict[str, int]:
    """What ``slurmd -C`` finds on this machine (CPUs, sockets, cores, threads, memory)."""
    environment = _clean_environment()
    result = subprocess.run(
        [_command("slurmd"), "-C"], capture_output=True, text=True, env=environment, timeout=60
    )
    if result.returncode != 0:
        raise SlurmClusterError(f"slurmd -C failed: {result.stderr.strip()}")
    first = result.stdout.splitlines()[0] if result.stdout.strip() else ""
    fields = dict(re.findall(r"(\w+)=(\S+)", first))
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    try:
        return {key: int(fields[key]) for key in keys}
    except (KeyError, ValueError) as error:
        raise SlurmClusterError(f"cannot read slurmd -C output {first!r}: {error}") from error


def _job_sort_key(name: str) -> tuple[int, int]:
    """Order "12", "12_0", "12_1", "12_10" and pending groups like "12_2-5" numerically."""
    job, _, task = name.partition("_")
    job_number = re.match(r"\d*", job).group()
    task_number = re.match(r"\[?(\d*)", task).group(1)
    return int(job_number or 0), int(task_number) if task_number else -1


def _parse_records(text: str) -> list[dict[str, str]]:
    """``scontrol -o show job`` lines (one per job) as dictionaries."""
    records = []
    for line in text.splitlines():
        if line.strip():
            pairs = re.findall(r"(\S+?)=(.*?)(?=\s+[A-Za-z][\w:/]*=|\s*$)", line.strip())
            records.append(dict(pairs))
    return records


class LocalSlurmCluster:
    """A SLURM cluster of one node (this machine), partition ``debug``, no accounting.

    Use as a context manager, or call ``start()`` and ``stop()``::

        with LocalSlurmCluster(tmp_path / "slurm") as cluster:
            job_id = cluster.submit(script, "--array=0-2")
            assert cluster.wait(job_id, timeout=30) == "COMPLETED"
    """

    def __init__(self, workdir: Path, *, start_timeout: float = 60.0, cred_expire: int = 10):
        if cred_expire < 5:
            raise ValueError(
                f"cred_expire must be at least 5 s (SLURM's minimum), not {cred_expire}"
            )
        self.workdir = Path(workdir).resolve()
        self.start_timeout = start_timeout
        # Lifetime of job credentials, which is also how long a requeued job waits before it
        # may start again (SLURM's default is 120 s, its minimum 5 s).
        self.cred_expire = cred_expire
        self.node_name = socket.gethostname().split(".")[0]
        self.partition = PARTITION
        self.conf_path = self.workdir / "slurm.conf"
        self.runtime_dir: Path | None = None
        self.ctld_port = self.slurmd_port = 0
        self.hardware: dict[str, int] = {}
        self._lock: int | None = None
        self._daemons: dict[str, subprocess.Popen] = {}
        self._running = False

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> LocalSlurmCluster:
        """Write the configuration, start munged, slurmctld and slurmd, wait for an idle node."""
        if self._running:
            return self
        reason = slurm_available()
        if reason:
            raise SlurmClusterError(reason)
        cleanup_stale_clusters()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.runtime_dir = Path(tempfile.mkdtemp(prefix=RUNTIME_PREFIX, dir=RUNTIME_PARENT))
        self.runtime_dir.chmod(0o755)  # munged: everyone must be able to reach its socket
        self._lock = os.open(self.runtime_dir / "owner.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._running = True
        atexit.register(self.stop)
        try:
            self.hardware = _node_hardware()
            self.ctld_port = _free_port()
            self.slurmd_port = _free_port(exclude=[self.ctld_port])
            self._write_config()
            self._start_munged()
            self._start_slurmctld()
            self._start_slurmd()
            self._wait_for_idle_node()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons, kill whatever they left, remove the runtime folder."""
        if not self._running:
            return
        self._running = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self._alive("slurmctld"):
            self._cancel_all_jobs()
        for name in ("slurmd", "slurmctld", "munged"):
            self._terminate(name)
        if self.runtime_dir is not None:
            _kill_marked(str(self.runtime_dir))
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    @property
    def running(self) -> bool:
        return self._running

    # ---------------------------------------------------------------- clients

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM commands (and for jobs, which inherit it through sbatch)."""
        if self.runtime_dir is None:
            raise SlurmClusterError("the cluster is not started")
        environment = _clean_environment()
        environment["SLURM_CONF"] = str(self.conf_path)
        environment[MARKER_VARIABLE] = str(self.runtime_dir)
        return environment

    def export_env(self, monkeypatch) -> None:
        """Point this process's own environment at the cluster, for code that calls SLURM
        without ``env=`` (datatrove's SlurmPipelineExecutor runs a bare ``sbatch``).

        Uses pytest's ``monkeypatch``, so it is undone after the test. Jobs submitted that way
        carry the cluster's marker too, so ``stop()`` also ends those still running.
        """
        for key in [key for key in os.environ if key.startswith(_FOREIGN_PREFIXES)]:
            monkeypatch.delenv(key)
        environment = self.env
        for key in ("SLURM_CONF", MARKER_VARIABLE):
            monkeypatch.setenv(key, environment[key])

    def run(
        self, *command: str, check: bool = True, timeout: float = 60.0, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        """Run a SLURM command (``cluster.run("scontrol", "show", "node")``) against this cluster."""
        result = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            env=self.env,
            cwd=cwd or self.workdir,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise SlurmClusterError(
                f"{' '.join(command)} exited with {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result

    def submit(
        self,
        script: Path | str,
        *sbatch_args: str,
        script_args: Sequence[str] = (),
        cwd: Path | None = None,
    ) -> str:
        """``sbatch --parsable [sbatch_args] script [script_args]``; returns the job id.

        The job's working directory (where ``slurm-%j.out`` lands unless ``--output`` is given)
        is ``cwd``, by default the script's folder.
        """
        script = Path(script).resolve()
        result = self.run(
            "sbatch",
            "--parsable",
            *sbatch_args,
            str(script),
            *script_args,
            cwd=cwd or script.parent,
        )
        job_id = result.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmClusterError(
                f"sbatch printed no job id: {result.stdout!r} {result.stderr!r}"
            )
        return job_id

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` records for a job; one per array task (pending ones grouped)."""
        result = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if result.returncode != 0:
            raise SlurmClusterError(
                f"scontrol knows no job {job_id}: {(result.stderr or result.stdout).strip()}"
            )
        return _parse_records(result.stdout)

    def states(self, job_id: str) -> dict[str, str]:
        """State of each job or array task: ``{"12": "RUNNING"}`` or ``{"12_0": ..., "12_1": ...}``."""
        states = {}
        for record in self.jobs(job_id):
            task = record.get("ArrayTaskId")
            name = (
                f"{record.get('ArrayJobId')}_{task}" if task else record.get("JobId", str(job_id))
            )
            states[name] = record.get("JobState", "UNKNOWN")
        return dict(sorted(states.items(), key=lambda item: _job_sort_key(item[0])))

    def state(self, job_id: str) -> str:
        """Current state of a job; for an array, see ``_summarise``."""
        return self._summarise(self.states(job_id))

    def wait(self, job_id: str, timeout: float = 60.0, poll: float = 0.25) -> str:
        """Wait until a job (every task of an array) reaches a final state and return it.

        For an array the result is the common state when all tasks agree, else the state of the
        first task (by id) that did not complete. Raises TimeoutError with the job's record and
        the daemons' log tails when ``timeout`` seconds pass first.
        """
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(job_id)
            if states and all(state in FINAL_STATES for state in states.values()):
                return self._summarise(states)
            if time.monotonic() > deadline:
                records = "\n".join(str(record) for record in self.jobs(job_id))
                raise TimeoutError(
                    f"job {job_id} not finished after {timeout:.0f} s: {states}\n{records}\n"
                    f"{self.log_tails(15)}"
                )
            time.sleep(poll)

    @staticmethod
    def _summarise(states: dict[str, str]) -> str:
        values = list(states.values())
        if len(set(values)) == 1:
            return values[0]
        not_completed = [state for state in values if state != "COMPLETED"]
        return not_completed[0] if not_completed else "COMPLETED"

    def log_tails(self, lines: int = 30) -> str:
        """The end of every daemon's output, for error messages.

        The daemons run in the foreground, where they copy their log (``<name>.log``) to stderr,
        so ``<name>.out`` holds the same lines plus anything written before the log was opened.
        """
        parts = []
        for name in ("munged", "slurmctld", "slurmd"):
            for path in (self.workdir / f"{name}.out", self.workdir / f"{name}.log"):
                if path.exists():
                    parts.append(f"--- {path} ---\n{_tail(path, lines)}")
                    break
        return "\n".join(parts)

    # ---------------------------------------------------------------- internals

    @property
    def munge_socket(self) -> Path:
        assert self.runtime_dir is not None
        return self.runtime_dir / "munge.socket"

    def _write_config(self) -> None:
        assert self.runtime_dir is not None
        work, hardware = self.workdir, self.hardware
        (work / "state").mkdir(exist_ok=True)
        (self.runtime_dir / "spool").mkdir()
        memory = max(256, hardware["RealMemory"] * 9 // 10)
        mem_per_cpu = max(64, min(1024, memory // hardware["CPUs"]))
        (work / "plugstack.conf").write_text("")  # not Debian's /etc/slurm/plugstack.conf
        lines = [
            "# Written by tests/slurm_cluster.py: one node, this machine, everything as root.",
            "ClusterName=kinoetest",
            f"SlurmctldHost={self.node_name}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            f"StateSaveLocation={work / 'state'}",
            f"SlurmdSpoolDir={self.runtime_dir / 'spool'}",
            f"SlurmctldPidFile={work / 'slurmctld.pid'}",
            f"SlurmdPidFile={work / 'slurmd.pid'}",
            f"SlurmctldLogFile={work / 'slurmctld.log'}",
            f"SlurmdLogFile={work / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={work / 'plugstack.conf'}",
            "MailProg=/bin/true",
            # No cgroups: plain process tracking, no binding.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobContainerType=job_container/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            # Without it a job gets the whole node's memory and jobs run one at a time.
            f"DefMemPerCPU={mem_per_cpu}",
            # No accounting: sacct does not work; finished jobs stay in scontrol for an hour.
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MinJobAge=3600",
            "JobRequeue=1",
            "ReturnToService=2",
            "KillWait=2",
            "OverTimeLimit=0",
            "InactiveLimit=0",
            "Waittime=0",
            "MessageTimeout=30",
            "TCPTimeout=10",
            "BatchStartTimeout=60",
            "SlurmctldTimeout=300",
            "SlurmdTimeout=300",
            "UnkillableStepTimeout=60",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            # A job whose dependency can never be met is cancelled instead of pending forever.
            "DependencyParameters=kill_invalid_depend",
            (
                f"NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={hardware['CPUs']} "
                f"Boards={hardware['Boards']} SocketsPerBoard={hardware['SocketsPerBoard']} "
                f"CoresPerSocket={hardware['CoresPerSocket']} "
                f"ThreadsPerCore={hardware['ThreadsPerCore']} RealMemory={memory} State=UNKNOWN"
            ),
            f"PartitionName={PARTITION} Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        out = open(self.workdir / f"{name}.out", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C meant for pytest reaches stop(), not them
            )
        finally:
            out.close()
        self._daemons[name] = process
        return process

    def _alive(self, name: str) -> bool:
        process = self._daemons.get(name)
        return process is not None and process.poll() is None

    def _check_alive(self, name: str) -> None:
        if not self._alive(name):
            code = self._daemons[name].returncode
            raise SlurmClusterError(f"{name} exited with status {code}\n{self.log_tails()}")

    def _wait_until(self, what: str, ready, daemons: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name in daemons:
                self._check_alive(name)
            if ready():
                return
            if time.monotonic() > deadline:
                raise SlurmClusterError(
                    f"{what} not ready after {timeout:.0f} s\n{self.log_tails()}"
                )
            time.sleep(0.2)

    def _start_munged(self) -> None:
        key = self.workdir / "munge.key"
        key.unlink(missing_ok=True)
        descriptor = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(os.urandom(128))
        self._spawn(
            "munged",
            [
                _command("munged"),
                "--foreground",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--log-file={self.workdir / 'munged.log'}",
                f"--pid-file={self.workdir / 'munged.pid'}",
                f"--seed-file={self.workdir / 'munged.seed'}",
                "--num-threads=2",
            ],
        )

        def munge_works() -> bool:
            if not self.munge_socket.exists():
                return False
            encode = subprocess.run(
                [_command("munge"), "-n", "-S", str(self.munge_socket)],
                capture_output=True,
                timeout=10,
            )
            if encode.returncode != 0:
                return False
            decode = subprocess.run(
                [_command("unmunge"), "-S", str(self.munge_socket)],
                input=encode.stdout,
                capture_output=True,
                timeout=10,
            )
            return decode.returncode == 0

        self._wait_until("munged", munge_works, ["munged"], timeout=self.start_timeout)

    def _start_slurmctld(self) -> None:
        (self.workdir / "slurmctld.pid").unlink(missing_ok=True)
        # -c: start from a clean state even when this workdir held an earlier cluster.
        self._spawn("slurmctld", [_command("slurmctld"), "-D", "-c", "-f", str(self.conf_path)])

        def controller_answers() -> bool:
            result = self.run("scontrol", "ping", check=False, timeout=30)
            return result.returncode == 0 and "UP" in result.stdout

        self._wait_until(
            "slurmctld", controller_answers, ["munged", "slurmctld"], timeout=self.start_timeout
        )

    def _start_slurmd(self) -> None:
        (self.workdir / "slurmd.pid").unlink(missing_ok=True)
        self._spawn(
            "slurmd",
            [_command("slurmd"), "-D", "-N", self.node_name, "-f", str(self.conf_path)],
        )

    def _wait_for_idle_node(self) -> None:
        def node_idle() -> bool:
            result = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=30)
            lines = [line.split() for line in result.stdout.splitlines()]
            return result.returncode == 0 and [self.node_name, "idle"] in lines

        self._wait_until(
            f"node {self.node_name} (idle in sinfo)",
            node_idle,
            ["munged", "slurmctld", "slurmd"],
            timeout=self.start_timeout,
        )

    def _cancel_all_jobs(self) -> None:
        with contextlib.suppress(Exception):
            result = self.run("squeue", "-h", "-o", "%A", check=False, timeout=20)
            job_ids = sorted(set(result.stdout.split()))
            if not job_ids:
                return
            self.run("scancel", *job_ids, check=False, timeout=20)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                result = self.run("squeue", "-h", "-o", "%A", check=False, timeout=20)
                if result.returncode != 0 or not result.stdout.strip():
                    return
                time.sleep(0.25)

    def _terminate(self, name: str, grace: float = 10.0) -> None:
        process = self._daemons.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=grace)

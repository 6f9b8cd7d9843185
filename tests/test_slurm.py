"""The slurm/ scripts under a real SLURM: slurmctld, slurmd and munged started here as a one-node cluster.

The training job is preempted the way SLURM does it (USR1 to the batch shell, as `--signal=B:USR1@...` sends
it), checkpoints, requeues itself, resumes under the same job id and ends with the weights of an uninterrupted
`bigsid train` of the same config, bit for bit. Needs root and Debian's slurm-wlm + munge (.ci/run installs
them); skipped otherwise. Everything the cluster needs lives in one temporary folder, including its own munge
key and socket, so that nothing in /etc or a system munged is touched.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigsid.checkpoint import complete_checkpoints
from conftest import TINY_TOY
from dist_worker import free_port

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "srun")

BATCH = 32
STEPS = 500  # long enough for the signal to land mid-run, short enough for seconds of CPU
# checkpoint_every=0: the only checkpoint before the final one is the preemption checkpoint.
TOY = [*TINY_TOY, f"train.total_nimg={BATCH * STEPS}", "train.checkpoint_every=0", "train.keep_checkpoints=5",
       "eval.num_samples=100"]
WRITTEN = re.compile(r"signal 10: checkpoint (\S+) written at step (\d+); exiting for requeue")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the SLURM test runs slurmctld/slurmd/munged itself and needs root"
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} missing): apt-get install -y slurm-wlm munge"
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def _wait(predicate, timeout: float, what: str, context=lambda: "", every: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{context()}")


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    # ---- daemons ----

    def start(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir()
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = r / "munge" / "munge.socket"
        self._spawn("munged", ["munged", "--foreground", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={r / 'munge' / 'munged.pid'}", f"--seed-file={r / 'munge' / 'seed'}",
                               f"--log-file={r / 'log' / 'munged.log'}"])
        _wait(sock.exists, 15, "munged's socket", self.logs)
        cpus = min(2, os.cpu_count() or 1)
        self.conf.write_text("\n".join([
            "ClusterName=bigsidtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may run again (default 120 s).
            f"AuthInfo=socket={sock},cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobRequeue=1",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            # The main scheduling loop runs every 60 s by default: a requeued job would idle that long.
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.host])

        def idle():
            out = subprocess.run(["sinfo", "-h", "-n", self.host, "-o", "%t"], env=self.env, capture_output=True,
                                 text=True, timeout=10)
            return out.returncode == 0 and out.stdout.strip() == "idle"

        _wait(idle, 60, f"node {self.host} to be idle in sinfo", self.logs, every=0.5)

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")
        # A session of its own: the daemons and their helpers (slurmscriptd) are stopped as one group.
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        out.close()
        time.sleep(0.2)
        if self.procs[-1].poll() is not None:
            raise AssertionError(f"{name} exited at once with status {self.procs[-1].returncode}\n{self.logs()}")

    def stop(self) -> None:
        if self.conf.exists() and any(p.poll() is None for p in self.procs):
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=30)
            try:
                _wait(lambda: not self.squeue(), 30, "cancelled jobs to leave the queue")
            except (AssertionError, subprocess.SubprocessError):
                pass
        for p in reversed(self.procs):  # slurmd, then slurmctld, then munged
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
            try:  # helpers left in the daemon's group (slurmscriptd) go with it
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # ---- clients ----

    def run(self, *argv: str) -> str:
        out = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{' '.join(argv)} -> {out.returncode}\n{out.stdout}{out.stderr}"
        return out.stdout

    def sbatch(self, script: str, args: list[str], *options: str, env: dict | None = None) -> str:
        argv = ["sbatch", "--parsable", *options, str(SLURM / script), *args]
        out = subprocess.run(argv, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"sbatch failed: {out.stdout}{out.stderr}"
        return out.stdout.strip().split(";")[0]

    def job(self, jid: str) -> dict[str, str]:
        line = self.run("scontrol", "-o", "show", "job", jid)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def squeue(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i").split()


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="bigsid-slurm-"))
    root.chmod(0o755)  # munged refuses a socket in a folder that not everyone may enter
    c = Cluster(root)
    try:
        t0 = time.monotonic()
        c.start()
        print(f"\nSLURM cluster up in {time.monotonic() - t0:.1f}s")
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def job_env(port: int | None = None) -> dict[str, str]:
    """What the jobs and the reference run share: one thread, so that CPU results are reproducible and small."""
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if port:
        env["MASTER_PORT"] = str(port)
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs of the jobs' configs, outside SLURM: `bigsid train` for one worker, torchrun for more.
    start() launches one in the background (once per config) and returns a function that awaits its final
    checkpoint, so that it trains while the SLURM job does."""
    runs: dict[tuple, tuple[subprocess.Popen, Path]] = {}

    def start(workers: int, extra: list[str]):
        key = (workers, *extra)
        if key not in runs:
            run_dir = tmp_path_factory.mktemp("reference") / "run"
            launch = [sys.executable, "-m", "bigsid.cli"]
            if workers > 1:
                launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc-per-node={workers}", "-m", "bigsid.cli"]
            with open(run_dir.parent / "train.log", "w") as log:
                runs[key] = (subprocess.Popen([*launch, "train", "-", *TOY, *extra, f"train.run_dir={run_dir}"],
                                              env={**os.environ, **job_env()}, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL), run_dir)

        def final() -> Path:
            proc, run_dir = runs[key]
            assert proc.wait(timeout=300) == 0, (run_dir.parent / "train.log").read_text()[-3000:]
            return complete_checkpoints(run_dir)[-1]

        return final

    yield start
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_same_weights(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert "generator.safetensors" in files
    assert files == sorted(p.name for p in b.glob("*.safetensors"))
    for name in files:
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}:{k} differs from the uninterrupted run"


def wait_state(cluster: Cluster, jid: str, states: set[str], timeout: float, log: Path) -> dict[str, str]:
    def reached():
        info = cluster.job(jid)
        return info if info["JobState"] in states else None

    def context():
        return (f"job {jid}: {cluster.job(jid)}\n--- job log\n" + (log.read_text()[-4000:] if log.exists() else "")
                + "\n" + cluster.logs())

    return _wait(reached, timeout, f"job {jid} to reach {states}", context, every=0.5)


def training_started(run_dir: Path) -> bool:
    """The trainer installs its signal handlers before the first step; a logged step proves the loop runs."""
    path = run_dir / "metrics.jsonl"
    return path.is_file() and bool(path.read_text().strip())


NO_DDP = importlib.util.find_spec("bigsid.parallel.ddp") is None


@pytest.mark.parametrize("script,options,workers,extra", [
    pytest.param("train.sbatch", (), 1, [], id="single-node"),
    pytest.param("train_multinode.sbatch", ("--nodes=1",), 1, [], id="multinode-srun"),
    # Two CPU workers under torchrun: every rank gets the signal, all agree on the step, one checkpoint.
    pytest.param("train.sbatch", (), 2, ["parallel.backend=ddp"], id="ddp-2-workers",
                 marks=pytest.mark.skipif(NO_DDP, reason="this tree has no ddp backend")),
])
def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_weights(cluster, reference, tmp_path, script,
                                                                           options, workers, extra):
    t0 = time.monotonic()
    run_dir = tmp_path / "run"
    (tmp_path / "logs").mkdir()
    uninterrupted = reference(workers, extra)
    jid = cluster.sbatch(script, ["-", *TOY, *extra, f"train.run_dir={run_dir}"], *options, f"--chdir={tmp_path}",
                         f"--output={tmp_path}/logs/%x-%j.out",
                         env={**job_env(free_port()), **({"GPUS_PER_NODE": str(workers)} if workers > 1 else {})})
    log = tmp_path / "logs" / f"bigsid-train-{jid}.out"
    evaluation = None
    if script == "train.sbatch" and workers == 1:  # the README's chain: evaluate after training, requeues included
        evaluation = cluster.sbatch("eval.sbatch", [str(run_dir)], f"--dependency=afterok:{jid}",
                                    f"--chdir={tmp_path}", f"--output={tmp_path}/logs/%x-%j.out", env=job_env())

    _wait(lambda: training_started(run_dir), 120, "the first logged training step",
          lambda: f"{cluster.job(jid)}\n" + (log.read_text() if log.exists() else "") + cluster.logs(), every=0.1)
    # What `#SBATCH --signal=B:USR1@GRACE` does at GRACE seconds before the time limit, at a moment of our choice.
    cluster.run("scancel", "--signal=USR1", "--batch", jid)
    t_signal = time.monotonic()
    info = wait_state(cluster, jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 180, log)
    t_done = time.monotonic()
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    assert info["Restarts"] == "1", f"one preemption, one requeue, one run to the end: {info}\n{text}"

    # The first run: the shell forwarded USR1, the trainer checkpointed mid-run, the shell requeued the job.
    assert "bigsid-slurm: got SIGUSR1" in text
    written = set(WRITTEN.findall(text))  # one line per rank, all naming the same checkpoint
    assert len(written) == 1, text
    (folder, step), = written
    folder, step = Path(folder), int(step)
    assert 0 < step < STEPS
    assert "bigsid-slurm: preempted; requeueing job" in text
    # The second run: same job id, same arguments, resumed from that checkpoint, ran to the end.
    assert "(restart 1)" in text
    assert text.count(f"resumed from {folder} at step {step}") == workers
    assert text.rstrip().endswith("bigsid-slurm: finished")
    assert [p.name for p in complete_checkpoints(run_dir)] == [folder.name, f"step-{STEPS:09d}"]
    assert_same_weights(complete_checkpoints(run_dir)[-1], uninterrupted())
    print(f"\n{script}, {workers} worker(s): submitted -> signal {t_signal - t0:.1f}s, signal -> COMPLETED "
          f"{t_done - t_signal:.1f}s (preempted at step {step}/{STEPS}, requeued, resumed; weights identical)")

    if evaluation is not None:
        ev_log = tmp_path / "logs" / f"bigsid-eval-{evaluation}.out"
        ev = wait_state(cluster, evaluation, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 120, ev_log)
        assert ev["JobState"] == "COMPLETED", f"{ev}\n{ev_log.read_text() if ev_log.exists() else ''}"
        assert ev["StartTime"] >= info["EndTime"], "afterok must wait for the requeued run, not the preempted one"
        assert "FD to the reference" in ev_log.read_text()  # the toy summary table
        assert json.loads((run_dir / "eval" / "toy_metrics.json").read_text())["step"] == STEPS


def test_time_limit_signal_reaches_the_batch_shell(cluster, tmp_path):
    """The script's own mechanism, nothing sent by hand: --signal=B:USR1@GRACE under a 1-minute limit. slurmctld
    looks for due signals every 30 s and sends one once fewer than GRACE + 30 s remain (as measured on 22.05), so
    GRACE=20 makes it land 10-40 s into the run: after the trainer has installed its handlers (a few seconds),
    long before the run would end."""
    run_dir = tmp_path / "run"
    (tmp_path / "logs").mkdir()
    long_run = [*TOY, f"train.total_nimg={BATCH * 10**6}", f"train.run_dir={run_dir}", "train.log_every=50"]
    jid = cluster.sbatch("train.sbatch", ["-", *long_run], "--time=1", "--signal=B:USR1@20", f"--chdir={tmp_path}",
                         f"--output={tmp_path}/logs/%x-%j.out", env=job_env())
    log = tmp_path / "logs" / f"bigsid-train-{jid}.out"
    try:
        _wait(lambda: int(cluster.job(jid)["Restarts"]) >= 1, 120, "SLURM's signal and the requeue",
              lambda: (log.read_text() if log.exists() else "") + cluster.logs(), every=1)
    finally:
        subprocess.run(["scancel", jid], env=cluster.env, capture_output=True, timeout=30)
    wait_state(cluster, jid, {"CANCELLED", "COMPLETED", "FAILED"}, 60, log)
    text = log.read_text()
    assert "bigsid-slurm: got SIGUSR1" in text
    (folder, step), *_ = WRITTEN.findall(text)
    assert int(step) > 0 and (Path(folder) / "COMPLETE").is_file()
    assert "bigsid-slurm: preempted; requeueing job" in text


def test_training_failure_fails_the_job_without_requeue(cluster, tmp_path):
    (tmp_path / "logs").mkdir()
    jid = cluster.sbatch("train.sbatch", ["-", *TINY_TOY, "train.batch_size=0", f"train.run_dir={tmp_path / 'run'}"],
                         f"--chdir={tmp_path}", f"--output={tmp_path}/logs/%x-%j.out", env=job_env())
    log = tmp_path / "logs" / f"bigsid-train-{jid}.out"
    info = wait_state(cluster, jid, {"COMPLETED", "FAILED", "CANCELLED"}, 120, log)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", f"{info}\n{text}"
    assert "bigsid: config error" in text and "train.batch_size" in text
    assert "not requeueing" in text and "requeueing job" not in text

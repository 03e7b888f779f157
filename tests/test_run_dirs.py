"""Runs own their directories: names from the clock are claimed exclusively, and a run dir has one writer.

Fast tests drive ``claim_new_dir`` and the lock directly (live, dead, reused-PID, other-host and
torchrun holders, racing take-overs) and the CLI against a fake live holder; the slow ones start
real runs, sweeps and torchrun jobs at once and kill them.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _env():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **ONE_THREAD}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def popen_cli(args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ds_hydra", *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def sleeper():
    """A live process that is not this one (to stand for another run holding a lock)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield proc
    proc.kill()
    proc.wait()


def write_lock(run_dir: Path, **fields) -> Path:
    """A lock record as another process would have written it (fields override a live-looking one)."""
    from ds_hydra.common.run_lock import LOCK_FILE, holder_record

    record = {**holder_record(), **fields}
    path = Path(run_dir) / LOCK_FILE
    path.write_text(json.dumps(record))
    return path


def record_of(pid: int, **fields):
    from ds_hydra.common.run_lock import process_start_time

    return {"pid": pid, "process_start": process_start_time(pid), "token": f"token-{pid}", **fields}


# -- names from the clock ----------------------------------------------------------------------------
def test_concurrent_claims_of_one_name_get_distinct_directories(tmp_path):
    from ds_hydra.common.run_dir import claim_new_dir

    wanted = tmp_path / "outputs" / "2024-05-01" / "12-00-00"
    got, start = [], threading.Barrier(8)

    def claim():
        start.wait()
        got.append(claim_new_dir(wanted))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in got) == ["12-00-00"] + [f"12-00-00_{n}" for n in range(1, 8)]
    assert all(p.is_dir() and not any(p.iterdir()) for p in got)


def test_only_clock_names_are_claimed():
    from ds_hydra.common.run_dir import names_the_clock

    assert names_the_clock("outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}")
    assert names_the_clock("runs/${now:%s}_${hydra.job.name}")
    assert not names_the_clock("runs/exp1")
    assert not names_the_clock("/shared/runs/${oc.env:JOB_ID}")


# -- the lock ----------------------------------------------------------------------------------------
def test_a_live_holder_is_named_and_the_directory_is_left_alone(tmp_path, sleeper):
    from ds_hydra.common.run_lock import RunLocked, acquire

    path = write_lock(tmp_path, **record_of(sleeper.pid, since_text="2024-05-01 12:00:03"))
    before = path.read_bytes()
    with pytest.raises(RunLocked) as refused:
        acquire(tmp_path)
    message = str(refused.value)
    assert f"pid {sleeper.pid} on {socket.gethostname()}, since 2024-05-01 12:00:03" in message
    assert "let it finish or stop it" in message and "\n" not in message
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path):
    from ds_hydra.common.run_lock import acquire, read_holder

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    record = record_of(gone.pid)
    gone.wait()
    path = write_lock(tmp_path, **record)
    lock = acquire(tmp_path)
    assert read_holder(path)["pid"] == os.getpid()
    assert lock.took_over.endswith(f"pid {gone.pid} is no longer running")
    lock.release()
    assert not path.exists()


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path, sleeper):
    """The PID runs, but it is another process than the one that took the lock (its start time differs)."""
    from ds_hydra.common.run_lock import acquire

    record = record_of(sleeper.pid)
    write_lock(tmp_path, **{**record, "process_start": record["process_start"] - 1000})
    lock = acquire(tmp_path)
    assert lock.took_over.endswith(f"pid {sleeper.pid} is another process now")
    lock.release()


def test_a_holder_from_before_a_reboot_is_taken_over(tmp_path, sleeper):
    from ds_hydra.common.run_lock import _boot_id, acquire

    if _boot_id() is None:
        pytest.skip("no boot id on this system")
    write_lock(tmp_path, **record_of(sleeper.pid, boot_id="another-boot"))
    lock = acquire(tmp_path)
    assert lock.took_over.endswith("this machine has restarted since")
    lock.release()


def test_another_hosts_lock_goes_stale_by_age_or_by_request(tmp_path):
    from ds_hydra.common.run_lock import LockSettings, RunLocked, acquire

    path = write_lock(tmp_path, host="node-elsewhere", pid=4242, token="t1", since_text="2024-05-01 12:00:03")
    with pytest.raises(RunLocked) as refused:
        acquire(tmp_path, LockSettings(stale_after_s=600))
    message = str(refused.value)
    assert "pid 4242 on node-elsewhere" in message and "run.lock_stale_after_s=600" in message
    assert "run.break_lock=true" in message

    past = time.time() - 601
    os.utime(path, (past, past))  # its holder stopped refreshing it ten minutes ago
    lock = acquire(tmp_path, LockSettings(stale_after_s=600))
    assert "not refreshed for 60" in lock.took_over
    lock.release()

    write_lock(tmp_path, host="node-elsewhere", pid=4242, token="t2")
    lock = acquire(tmp_path, LockSettings(stale_after_s=0, break_lock=True))  # 0: never by age
    assert lock.took_over.endswith("run.break_lock=true")
    lock.release()


def test_an_earlier_torchrun_attempt_of_the_same_job_is_taken_over(tmp_path, monkeypatch):
    from ds_hydra.common.run_lock import RunLocked, acquire

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    write_lock(tmp_path, host="node-0", pid=11, token="a", torchrun={"run_id": "job-8", "restart": 0})
    with pytest.raises(RunLocked, match="torchrun job job-8"):
        acquire(tmp_path)  # another job's rank 0: not ours to take
    write_lock(tmp_path, host="node-0", pid=11, token="b", torchrun={"run_id": "job-7", "restart": 0})
    lock = acquire(tmp_path)
    assert "attempt 0 of this torchrun job" in lock.took_over
    assert lock.record["torchrun"] == {"run_id": "job-7", "restart": 1}
    lock.release()


def _race_for(run_dir: str, results) -> None:
    from ds_hydra.common.run_lock import RunLocked, acquire

    try:
        lock = acquire(Path(run_dir))
        results.put(("won", os.getpid()))
        time.sleep(1.0)  # hold it while the others try
        lock.release()  # (a forked multiprocessing child skips atexit)
    except RunLocked as exc:
        results.put(("refused", str(exc)))


def test_racing_take_overs_of_one_stale_lock_leave_one_holder(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    record = record_of(gone.pid)
    gone.wait()
    write_lock(tmp_path, **record)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    racers = [ctx.Process(target=_race_for, args=(str(tmp_path), results)) for _ in range(6)]
    for p in racers:
        p.start()
    outcomes = [results.get(timeout=60) for _ in racers]
    for p in racers:
        p.join(timeout=60)
    winners = [o for o in outcomes if o[0] == "won"]
    assert len(winners) == 1, outcomes
    assert all(f"pid {winners[0][1]} on" in text for kind, text in outcomes if kind == "refused"), outcomes
    assert not list(tmp_path.glob("run.lock*")), list(tmp_path.iterdir())  # released, no take-over claim left


def test_the_holder_refreshes_its_lock_and_removes_only_its_own(tmp_path):
    from ds_hydra.common.run_lock import LockSettings, RunLocked, acquire, holding

    lock = acquire(tmp_path, LockSettings(stale_after_s=0.4))  # refreshed every 0.1 s
    first = lock.path.stat().st_mtime_ns
    time.sleep(0.35)
    assert lock.path.stat().st_mtime_ns > first
    with holding(tmp_path, held=lock) as inner:  # train() inside the CLI: the lock its StartUp holds
        assert inner is lock
    assert lock.path.exists()  # kept: its owner releases it
    with pytest.raises(RunLocked, match="in use by this process already"):  # a second writer, in this process too
        with holding(tmp_path):
            pass
    lock.release()
    with holding(tmp_path) as own:  # train() on its own: locks for the call
        assert own is not lock and own.path.exists()
    assert not lock.path.exists()
    other = write_lock(tmp_path, host="node-elsewhere", token="someone-else")
    lock.release()  # released twice, after another process took it: theirs stays
    assert other.exists()


def test_a_refused_run_claims_no_directory(tmp_path):
    proc = run_cli([*TINY, "optimizer.lr=-1", f"hydra.run.dir={tmp_path}/runs/" + "${now:%Y}"], cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 2 and "optimizer.lr=-1" in proc.stderr
    assert not (tmp_path / "runs").exists()


# -- real runs at once ---------------------------------------------------------------------------------
def wait_until(proc: subprocess.Popen, condition, timeout: float = 180) -> None:
    """Poll ``condition`` while ``proc`` runs; fail (with its output) if it exits or time runs out first."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


def has_metrics(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and bool(path.read_text().strip())


def _results(run_dir: Path):
    import yaml

    completed = json.loads((run_dir / "completed.json").read_text())
    resolved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return completed, resolved, steps


@pytest.mark.slow
def test_four_runs_started_at_once_write_four_complete_runs(tmp_path):
    """Four launches from one folder whose run-dir name (from the clock, by the year) is the same:
    each claims its own directory, and each directory holds one complete run of its own seed."""
    args = [*TINY, "trainer.max_steps=4", "trainer.eval_interval=0", "hydra.run.dir=runs/${now:%Y}"]
    procs = {seed: popen_cli([*args, f"trainer.seed={seed}"], cwd=tmp_path) for seed in (1, 2, 3, 4)}
    for seed, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    dirs = sorted((tmp_path / "runs").iterdir())
    year = time.strftime("%Y")
    assert [d.name for d in dirs] == [year, f"{year}_1", f"{year}_2", f"{year}_3"]
    seeds = []
    for run_dir in dirs:
        completed, resolved, steps = _results(run_dir)
        seed = resolved["trainer"]["seed"]
        assert completed["config"]["trainer.seed"] == seed and completed["step"] == 4
        assert steps == [2, 4, 4]  # two log records and the final evaluation: one run's, once
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_0000004.pt"]
        assert not (run_dir / "run.lock").exists()
        seeds.append(seed)
        if run_dir.name != year:
            assert f"runs/{year} was taken by another run; this run writes into runs/{run_dir.name}" in (run_dir / "ds_hydra.log").read_text()
    assert sorted(seeds) == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_sweeps_started_at_once_write_two_complete_reports(tmp_path):
    import csv

    args = ["-m", *TINY, "trainer.max_steps=2", "trainer.eval_interval=0", "optimizer.lr=0.001,0.002,0.003",
            "hydra.sweep.dir=sweeps/${now:%Y}"]
    procs = {seed: popen_cli([*args, f"trainer.seed={seed}"], cwd=tmp_path) for seed in (1, 2)}
    for proc in procs.values():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    sweeps = sorted((tmp_path / "sweeps").iterdir())
    assert len(sweeps) == 2
    seeds = set()
    for sweep_dir in sweeps:
        with open(sweep_dir / "sweep_summary.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["job"] for r in rows] == ["0", "1", "2"] and all(r["status"] == "completed" for r in rows)
        job_seeds = {_results(sweep_dir / r["job"])[1]["trainer"]["seed"] for r in rows}
        assert len(job_seeds) == 1  # every job of this sweep is this sweep's
        seeds |= job_seeds
        assert not list(sweep_dir.rglob("run.lock"))
    assert seeds == {1, 2}


@pytest.mark.slow
def test_resume_of_a_live_run_is_refused_and_the_live_run_finishes_unharmed(tmp_path):
    run_dir = tmp_path / "run"
    live = popen_cli([*TINY, "trainer.max_steps=300", "trainer.log_interval=1", "trainer.eval_interval=0",
                      "trainer.save_every=50", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    try:
        wait_until(live, lambda: has_metrics(run_dir))
        live.send_signal(signal.SIGSTOP)  # alive, holding its lock, while the second command runs
        hydra_files = {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
        refused = run_cli([f"resume={run_dir}"], env=ONE_THREAD)
        live.send_signal(signal.SIGCONT)
        out, err = live.communicate(timeout=240)
    finally:
        if live.poll() is None:
            live.kill()
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert f"in use by another ds_hydra process (pid {live.pid} on {socket.gethostname()}, since " in lines[0]
    assert live.returncode == 0, err[-3000:]
    completed, _, steps = _results(run_dir)
    assert steps == list(range(1, 301)) + [300] and completed["step"] == 300
    assert {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_files
    assert not (run_dir / "run.lock").exists()


@pytest.mark.slow
def test_a_killed_runs_lock_is_taken_over_by_resume(tmp_path):
    run_dir = tmp_path / "run"
    live = popen_cli([*TINY, "trainer.max_steps=100000", "trainer.log_interval=1", "trainer.eval_interval=0",
                      "trainer.save_every=5", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    try:
        wait_until(live, lambda: list((run_dir / "checkpoints").glob("step_*.pt")))
    finally:
        live.kill()  # SIGKILL: no chance to release its lock
        live.wait()
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == live.pid
    resumed = run_cli([f"resume={run_dir}", "trainer.max_steps=20"], env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"took over the lock of pid {live.pid} on {socket.gethostname()}" in (run_dir / "ds_hydra.log").read_text()
    completed, _, steps = _results(run_dir)
    assert completed["step"] == 20 and steps == list(range(1, 21)) + [20]
    assert not (run_dir / "run.lock").exists()


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.mark.slow
def test_torchrun_rank_zero_holds_one_lock_released_at_exit_and_after_a_crash(tmp_path):
    from test_distributed import torchrun_cmd

    base = [*TINY, "trainer.log_interval=1", "trainer.eval_interval=0", "engine=ddp"]
    run_dir = tmp_path / "crash"
    proc = subprocess.Popen(torchrun_cmd([*base, "trainer.max_steps=100000", f"hydra.run.dir={run_dir}"]), cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(proc, lambda: has_metrics(run_dir))
        workers = {rank_of(int(pid)): int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()}
        locks = list(tmp_path.rglob("run.lock*"))
        holder = json.loads((run_dir / "run.lock").read_text())
        os.kill(workers[1], signal.SIGKILL)  # rank 1 dies; rank 0 fails on its next collective
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert locks == [run_dir / "run.lock"]  # one lock for both ranks
    assert holder["pid"] == workers[0] and holder["torchrun"]["restart"] == 0  # rank 0 holds it for both
    assert proc.returncode != 0 and not (run_dir / "run.lock").exists(), err[-3000:]

    done = subprocess.run(torchrun_cmd([*base, "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'done'}"]), cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.rglob("run.lock*"))


def test_every_file_of_a_run_has_the_mode_the_umask_gives_new_files(tmp_path):
    """Checkpoints, the resolved config, the loss curve and completed.json are written through temp
    files (private, 0600) and renamed; they get the mode of any new file, as Hydra's and the log do."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ds_hydra", *TINY, "trainer.max_steps=2", "trainer.log_interval=1",
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=lambda: os.umask(0o027))
    assert proc.returncode == 0, proc.stderr
    modes = {str(p.relative_to(run_dir)): oct(p.stat().st_mode & 0o777) for p in run_dir.rglob("*")}
    files = {name for name in modes if (run_dir / name).is_file()}
    assert {"checkpoints/step_0000002.pt", "config_resolved.yaml", "loss_curve.png", "completed.json", "metrics.jsonl",
            "ds_hydra.log", ".hydra/config.yaml"} <= files
    assert {modes[name] for name in files} == {"0o640"}, modes  # 0666 & ~027
    assert {modes[name] for name in modes if name not in files} == {"0o750"}, modes


def test_the_mode_of_new_files_is_read_without_changing_the_umask():
    from ds_hydra.common.files import new_dir_mode, new_file_mode

    before = os.umask(0o077)
    try:
        assert (new_file_mode(), new_dir_mode()) == (0o600, 0o700)
        os.umask(0o002)
        assert (new_file_mode(), new_dir_mode()) == (0o664, 0o775)
        assert os.umask(0o002) == 0o002  # left as it was
    finally:
        os.umask(before)

"""The multi-process launcher: what a crashed rank leaves in the test's report, and when a launch runs again."""

import os
import time
from multiprocessing import util
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from dist_worker import start_ranks


def wait_for(predicate) -> None:
    # the ranks run concurrently: without waiting on each other, which of them the launcher sees end first is a race
    end = time.monotonic() + 120
    while not predicate():
        assert time.monotonic() < end, "the other rank never got there"
        time.sleep(0.01)


def exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


def abort_once_rank_0_exited(folder: str) -> None:
    wait_for(lambda: Path(folder, "pid0").exists())
    pid = int(Path(folder, "pid0").read_text())
    wait_for(lambda: exited(pid))
    os.abort()


def abort_after_returning(rank: int, folder: str) -> None:
    if rank == 0:
        Path(folder, "pid0.tmp").write_text(str(os.getpid()))
        Path(folder, "pid0.tmp").rename(Path(folder, "pid0"))
    else:  # once the work is done, as the process exits, after rank 0 has exited
        util.Finalize(None, abort_once_rank_0_exited, args=(folder,), exitpriority=10)


def abort_on_first_launch(rank: int, flag: str) -> None:
    if rank == 1 and not Path(flag).exists():
        Path(flag).touch()
        os.abort()


def abort_always(rank: int, folder: str) -> None:
    print(f"rank {rank} at work", flush=True)
    if rank == 0:
        Path(folder, "working0").touch()
    else:
        wait_for(lambda: Path(folder, "working0").exists())
        Path(folder, "working0").unlink()  # the next launch waits for its own rank 0
        os.abort()


def test_a_crash_after_the_work_is_reported_not_failed(tmp_path):
    with pytest.warns(UserWarning, match="rank 1 died by SIGABRT after every rank's work was done"):
        start_ranks(abort_after_returning, (str(tmp_path),), 2)


def test_a_crash_before_the_work_is_done_launches_once_more(tmp_path):
    flag = tmp_path / "crashed"
    with pytest.warns(UserWarning, match="before every rank's work was done; launching again"):
        start_ranks(abort_on_first_launch, (str(flag),), 2)
    assert flag.exists()


def test_a_second_crash_fails_with_every_ranks_output(tmp_path):
    with pytest.warns(UserWarning, match="launching again"), pytest.raises(mp.ProcessExitedException) as crash:
        start_ranks(abort_always, (str(tmp_path),), 2)
    printed = "\n".join(crash.value.__notes__)
    assert "rank 0 at work" in printed and "rank 1 at work" in printed
    assert "Fatal Python error: Aborted" in printed and "in abort_always" in printed

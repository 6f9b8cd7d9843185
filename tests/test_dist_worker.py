"""The multi-process launcher: what a crashed rank leaves in the test's report, and when a launch runs again."""

import os
from multiprocessing import util
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from dist_worker import start_ranks


def abort_after_returning(rank: int) -> None:
    if rank == 1:  # once the work is done, as the process exits
        util.Finalize(None, os.abort, exitpriority=10)


def abort_on_first_launch(rank: int, flag: str) -> None:
    if rank == 1 and not Path(flag).exists():
        Path(flag).touch()
        os.abort()


def abort_always(rank: int) -> None:
    print(f"rank {rank} at work", flush=True)
    if rank == 1:
        os.abort()


def test_a_crash_after_the_work_is_reported_not_failed():
    with pytest.warns(UserWarning, match="rank 1 died by SIGABRT after every rank's work was done"):
        start_ranks(abort_after_returning, (), 2)


def test_a_crash_before_the_work_is_done_launches_once_more(tmp_path):
    flag = tmp_path / "crashed"
    with pytest.warns(UserWarning, match="before every rank's work was done; launching again"):
        start_ranks(abort_on_first_launch, (str(flag),), 2)
    assert flag.exists()


def test_a_second_crash_fails_with_every_ranks_output():
    with pytest.warns(UserWarning, match="launching again"), pytest.raises(mp.ProcessExitedException) as crash:
        start_ranks(abort_always, (), 2)
    printed = "\n".join(crash.value.__notes__)
    assert "rank 0 at work" in printed and "rank 1 at work" in printed
    assert "Fatal Python error: Aborted" in printed and "in abort_always" in printed

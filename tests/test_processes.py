"""stream/processes.py's pure parts: each process's command line (parsed by the real CLI
parser, as the child parses it) and the exit status it reports."""
from __future__ import annotations

import signal

import pytest

from stream.cli import build_parser
from stream.errors import ClickscoreError
from stream.processes import check_processes, child_argv, exit_status
from stream.settings import settings_from_args


def parsed(argv: list[str]):
    return settings_from_args(build_parser().parse_args(argv))


@pytest.mark.parametrize("metrics_port", [9464, 0])
def test_each_process_gets_its_own_ports_and_data_dir_and_runs_one_process(metrics_port, tmp_path):
    argv = ["worker", "--processes", "3", "--web-port", "7000", "--metrics-port", str(metrics_port),
            "--data-dir", str(tmp_path), "--batch-size", "64"]
    parent = parsed(argv)
    children = [parsed(child_argv(argv, i, parent)[3:]) for i in range(3)]   # after python -m stream.cli
    assert [c.processes for c in children] == [1, 1, 1]
    assert [c.web_port for c in children] == [7000, 7001, 7002]
    assert [c.metrics_port for c in children] == ([9464, 9465, 9466] if metrics_port else [0, 0, 0])
    assert [c.data_dir for c in children] == [str(tmp_path / f"process-{i}") for i in range(3)]
    assert all(c.batch_size == 64 for c in children)   # everything else as the parent was given


def test_the_default_data_dir_is_split_too():
    argv = ["worker", "--processes", "2", "--app-id", "shop"]
    parent = parsed(argv)
    dirs = [parsed(child_argv(argv, i, parent)[3:]).data_dir for i in range(2)]
    assert dirs[0] != dirs[1] and all(d.endswith(f"clickscore-shop/process-{i}") for i, d in enumerate(dirs))


def test_more_processes_than_partitions_is_refused_with_what_to_do():
    check_processes(4, 4, "clicks")
    with pytest.raises(ClickscoreError, match="--processes 5 is more than the 4 partitions of clicks.*"
                                              "Use --processes 4 or fewer"):
        check_processes(5, 4, "clicks")


def test_exit_status_reads_a_signal_as_the_shell_does():
    assert exit_status(0) == 0 and exit_status(2) == 2
    assert exit_status(-signal.SIGKILL) == 137

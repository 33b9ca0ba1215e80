"""Tests of the slurm command launcher on CPU, without a Slurm cluster.

The jobs run through submitit's LocalExecutor (JPS_SLURM_EXECUTOR=local), which
runs the same pickled job function as a Slurm job but in a local process. The
sbatch file is checked against a fake ``sbatch`` that these tests write.
"""

import importlib.metadata
import importlib.util
import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest

from jps_domainbed import launchers
from jps_domainbed.launchers import (JobsFailedError, SettingsError, SlurmSettings,
                                     slurm_launcher)

from domainbed_support import INSTALL_HINT, run_module

# Minutes after which the local executor kills a job, so a hung job fails the test.
JOB_TIME_LIMIT_MIN = 10
TRAIN_HPARAMS = '{"batch_size": 8}'


def launcher_skip_reason():
    """Return why the DomainBed launcher tests cannot run, or None when they can."""
    try:
        from domainbed import command_launchers
    except ImportError as error:
        return "domainbed.command_launchers is not importable ({}). To fix it, {}".format(
            error, INSTALL_HINT)
    if "slurm" not in command_launchers.REGISTRY:
        return ("'slurm' is missing from domainbed.command_launchers.REGISTRY {}, so DomainBed "
                "lacks the entry-point hook or jps-domainbed is not installed. To fix it, "
                "{}".format(sorted(command_launchers.REGISTRY), INSTALL_HINT))
    return None


LAUNCHER_SKIP_REASON = launcher_skip_reason()
requires_slurm_registry = pytest.mark.skipif(LAUNCHER_SKIP_REASON is not None,
                                             reason=str(LAUNCHER_SKIP_REASON))
requires_submitit = pytest.mark.skipif(
    importlib.util.find_spec("submitit") is None,
    reason="submitit is not installed. Install it with pip install 'jps-domainbed[slurm]'")


@pytest.fixture
def launcher_env(monkeypatch, tmp_path):
    """Run in tmp_path with the local executor and logs under tmp_path/logs."""
    for name in list(os.environ):
        if name.startswith(launchers.ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv("JPS_SLURM_EXECUTOR", "local")
    monkeypatch.setenv("JPS_SLURM_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("JPS_SLURM_TIME", str(JOB_TIME_LIMIT_MIN))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    run_module("jps_domainbed.mnist_data", "--data_dir", data_dir, timeout=300)
    return data_dir


def train_command(data_dir, output_dir, test_env):
    """A DomainBed training command in the form sweep.py's Job builds, 3 steps long."""
    return ("{} -m domainbed.scripts.train --algorithm ERM --data_dir {} --dataset ColoredMNIST "
            "--hparams {} --output_dir {} --steps 3 --test_envs {}".format(
                shlex.quote(sys.executable), shlex.quote(str(data_dir)),
                shlex.quote(TRAIN_HPARAMS), shlex.quote(str(output_dir)), test_env))


def write_fake_slurm(bin_dir, copy_path):
    """Write an sbatch that copies its script to copy_path, and an srun that fails."""
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text('#!/bin/sh\ncp "$1" {}\necho "Submitted batch job 4242"\n'.format(
        shlex.quote(str(copy_path))))
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 1\n")
    for tool in (sbatch, srun):
        tool.chmod(0o755)


def wait_for_file(path, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return path.exists()


# Settings


def test_settings_defaults():
    settings = SlurmSettings.from_env({})
    assert settings.executor == "slurm"
    assert settings.time_min == 24 * 60
    assert settings.gpus == 1
    assert settings.cpus == 8
    assert settings.mem_gb is None
    assert settings.array_parallelism is None
    assert settings.log_dir == "slurm_logs"
    assert settings.extra == {}
    assert settings.wait is True


def test_settings_all_variables():
    environ = {
        "JPS_SLURM_EXECUTOR": "local",
        "JPS_SLURM_PARTITION": "gpu",
        "JPS_SLURM_TIME": "90",
        "JPS_SLURM_GPUS": "2",
        "JPS_SLURM_CPUS": "4",
        "JPS_SLURM_MEM_GB": "24.5",
        "JPS_SLURM_ACCOUNT": "lab",
        "JPS_SLURM_QOS": "high",
        "JPS_SLURM_ARRAY_PARALLELISM": "16",
        "JPS_SLURM_LOG_DIR": "/scratch/logs",
        "JPS_SLURM_EXTRA": '{"slurm_constraint": "a100"}',
        "JPS_SLURM_WAIT": "no",
    }
    parameters = SlurmSettings.from_env(environ).executor_parameters()
    assert parameters == {
        "name": "domainbed", "timeout_min": 90, "nodes": 1, "tasks_per_node": 1,
        "gpus_per_node": 2, "cpus_per_task": 4, "mem_gb": 24.5,
        "slurm_partition": "gpu", "slurm_account": "lab", "slurm_qos": "high",
        "slurm_array_parallelism": 16, "slurm_constraint": "a100",
    }
    assert SlurmSettings.from_env(environ).wait is False
    assert SlurmSettings.from_env(environ).log_dir == "/scratch/logs"


def test_settings_empty_values_keep_defaults():
    environ = {"JPS_SLURM_TIME": "", "JPS_SLURM_EXECUTOR": " ", "JPS_SLURM_EXTRA": ""}
    assert SlurmSettings.from_env(environ) == SlurmSettings()


def test_settings_zero_gpus_on_slurm():
    slurm = SlurmSettings.from_env({"JPS_SLURM_GPUS": "0"}).executor_parameters()
    local = SlurmSettings.from_env({"JPS_SLURM_GPUS": "0",
                                    "JPS_SLURM_EXECUTOR": "local"}).executor_parameters()
    assert "gpus_per_node" not in slurm
    assert local["gpus_per_node"] == 0


@pytest.mark.parametrize("name, value, expected", [
    ("JPS_SLURM_TIME", "abc", "whole number of minutes"),
    ("JPS_SLURM_TIME", "1.5", "whole number of minutes"),
    ("JPS_SLURM_TIME", "0", "at least 1"),
    ("JPS_SLURM_GPUS", "-1", "at least 0"),
    ("JPS_SLURM_CPUS", "four", "CPUs per job"),
    ("JPS_SLURM_ARRAY_PARALLELISM", "0", "at least 1"),
    ("JPS_SLURM_MEM_GB", "-2", "positive number of gigabytes"),
    ("JPS_SLURM_MEM_GB", "lots", "positive number of gigabytes"),
    ("JPS_SLURM_EXTRA", "{bad json", "Invalid JSON"),
    ("JPS_SLURM_EXTRA", "[1, 2]", "expected a JSON object"),
    ("JPS_SLURM_EXTRA", '{"constraint": "a100"}', "starting with 'slurm_'"),
    ("JPS_SLURM_EXECUTOR", "pbs", "expected one of slurm, local, debug"),
    ("JPS_SLURM_WAIT", "maybe", "expected 1 or 0"),
])
def test_settings_invalid_value(name, value, expected):
    with pytest.raises(SettingsError) as raised:
        SlurmSettings.from_env({name: value})
    message = str(raised.value)
    assert name in message
    assert repr(value) in message
    assert expected in message


# Launcher guards


@requires_submitit
def test_launcher_unknown_extra_key(launcher_env):
    os.environ["JPS_SLURM_EXTRA"] = '{"slurm_no_such_option": 1}'
    with pytest.raises(SettingsError) as raised:
        slurm_launcher(["true"])
    assert "JPS_SLURM_EXTRA" in str(raised.value)
    assert "no_such_option" in str(raised.value)


def test_launcher_invalid_setting_submits_nothing(launcher_env):
    os.environ["JPS_SLURM_TIME"] = "soon"
    with pytest.raises(SettingsError) as raised:
        slurm_launcher(["touch ran"])
    assert "JPS_SLURM_TIME='soon'" in str(raised.value)
    assert "delete_incomplete" in str(raised.value)
    assert not (launcher_env / "logs").exists()
    assert not (launcher_env / "ran").exists()


@requires_submitit
def test_launcher_without_sbatch(launcher_env, monkeypatch):
    monkeypatch.setenv("JPS_SLURM_EXECUTOR", "slurm")
    monkeypatch.setenv("PATH", str(launcher_env / "empty-bin"))
    with pytest.raises(RuntimeError) as raised:
        slurm_launcher(["true"])
    message = str(raised.value)
    assert "sbatch" in message
    assert "not found on PATH" in message
    assert "JPS_SLURM_EXECUTOR=local" in message


def test_launcher_without_submitit(launcher_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ImportError) as raised:
        slurm_launcher(["true"])
    assert "pip install submitit" in str(raised.value)
    assert "jps-domainbed[slurm]" in str(raised.value)


def test_launcher_no_commands(launcher_env, capsys):
    slurm_launcher([])
    assert "no commands to launch" in capsys.readouterr().out
    assert not (launcher_env / "logs").exists()


@requires_submitit
def test_launcher_sbatch_rejects_array(launcher_env, monkeypatch):
    bin_dir = launcher_env / "failing-bin"
    bin_dir.mkdir()
    for tool, script in [("sbatch", "echo 'sbatch: error: invalid partition specified: nope' >&2"
                                     "\nexit 1"),
                         ("srun", "exit 1")]:
        (bin_dir / tool).write_text("#!/bin/sh\n{}\n".format(script))
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", "{}{}{}".format(bin_dir, os.pathsep, os.environ["PATH"]))
    monkeypatch.setenv("JPS_SLURM_EXECUTOR", "slurm")
    monkeypatch.setenv("JPS_SLURM_PARTITION", "nope")

    with pytest.raises(launchers.SubmissionError) as raised:
        slurm_launcher(["true", "true"])

    message = str(raised.value)
    assert "sbatch rejected the job array of 2 jobs" in message
    assert "invalid partition specified: nope" in message
    assert "delete_incomplete" in message


# Launcher runs


@requires_submitit
def test_failing_command_does_not_stop_others(launcher_env):
    commands = ["echo failing on purpose >&2; exit 3", "sleep 1; echo finished > other.txt"]
    with pytest.raises(JobsFailedError) as raised:
        slurm_launcher(commands)
    failures = raised.value.failures
    assert len(failures) == 1
    assert failures[0].command == commands[0]
    assert "status 3" in failures[0].reason
    assert failures[0].stderr_path.exists()
    assert "failing on purpose" in failures[0].stderr_path.read_text()
    assert (launcher_env / "other.txt").read_text() == "finished\n"
    message = str(raised.value)
    assert "1 of 2 DomainBed jobs failed" in message
    assert failures[0].job_id in message
    assert str(failures[0].stderr_path) in message


@requires_submitit
def test_job_list_names_each_command(launcher_env):
    commands = ["echo first", "echo second"]
    slurm_launcher(commands)
    job_lists = list((launcher_env / "logs").glob("*/jobs.tsv"))
    assert len(job_lists) == 1
    rows = job_lists[0].read_text().splitlines()
    assert rows[0] == "job_id\tcommand"
    assert [row.split("\t", 1)[1] for row in rows[1:]] == commands


@requires_submitit
def test_commands_run_in_launch_folder(launcher_env, monkeypatch):
    monkeypatch.setenv("JPS_SLURM_EXECUTOR", "debug")
    slurm_launcher(["pwd > where.txt"])
    assert (launcher_env / "where.txt").read_text().strip() == str(launcher_env)


@requires_submitit
def test_no_wait_returns_after_submission(launcher_env, capsys):
    os.environ["JPS_SLURM_WAIT"] = "0"
    started = time.monotonic()
    slurm_launcher(["sleep 3; touch late.txt"])
    returned_after_s = time.monotonic() - started
    assert "Not waiting for the jobs" in capsys.readouterr().out
    assert not (launcher_env / "late.txt").exists()
    assert returned_after_s < 3
    # Let the job finish, so that no process outlives the test.
    assert wait_for_file(launcher_env / "late.txt", timeout_s=60)


@requires_submitit
def test_slurm_sbatch_file(launcher_env, monkeypatch, capsys):
    script_copy = launcher_env / "submission.sh"
    write_fake_slurm(launcher_env / "fake-bin", script_copy)
    monkeypatch.setenv("PATH", "{}{}{}".format(launcher_env / "fake-bin", os.pathsep,
                                               os.environ["PATH"]))
    environ = {
        "JPS_SLURM_EXECUTOR": "slurm", "JPS_SLURM_WAIT": "0", "JPS_SLURM_PARTITION": "gpu",
        "JPS_SLURM_TIME": "30", "JPS_SLURM_GPUS": "2", "JPS_SLURM_CPUS": "4",
        "JPS_SLURM_MEM_GB": "16", "JPS_SLURM_ACCOUNT": "lab", "JPS_SLURM_QOS": "high",
        "JPS_SLURM_ARRAY_PARALLELISM": "1",
        "JPS_SLURM_EXTRA": json.dumps({"slurm_constraint": "a100"}),
    }
    for name, value in environ.items():
        monkeypatch.setenv(name, value)

    slurm_launcher(["echo first", "echo second"])

    output = capsys.readouterr().out
    assert "4242_0 4242_1" in output
    assert "scancel 4242" in output
    script = script_copy.read_text().splitlines()
    for line in ["#SBATCH --array=0-1%1", "#SBATCH --partition=gpu", "#SBATCH --time=30",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem=16GB", "#SBATCH --account=lab", "#SBATCH --qos=high",
                 "#SBATCH --constraint=a100", "#SBATCH --job-name=domainbed"]:
        assert line in script


# DomainBed


@requires_slurm_registry
@pytest.mark.domainbed
def test_registry_has_slurm_launcher(launcher_env, capsys):
    from domainbed import command_launchers

    entry_points = importlib.metadata.entry_points(group="domainbed.command_launchers")
    values = {entry_point.name: entry_point.value for entry_point in entry_points}
    assert values["slurm"] == "jps_domainbed.launchers:slurm_launcher"
    # The registry loads the entry point when called. An empty list submits nothing.
    command_launchers.REGISTRY["slurm"]([])
    assert "slurm launcher: no commands to launch." in capsys.readouterr().out


@requires_slurm_registry
@requires_submitit
@pytest.mark.domainbed
@pytest.mark.slow
def test_two_train_jobs(launcher_env, mnist_dir, monkeypatch):
    # One OpenMP thread per job, so that the two parallel jobs do not
    # oversubscribe the CPU cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output_dirs = [launcher_env / "out" / "test_env_{}".format(env) for env in (0, 1)]
    commands = [train_command(mnist_dir, output_dir, test_env)
                for test_env, output_dir in enumerate(output_dirs)]

    slurm_launcher(commands)

    for output_dir in output_dirs:
        assert (output_dir / "done").exists()
        records = (output_dir / "results.jsonl").read_text().splitlines()
        assert records
        assert json.loads(records[-1])["step"] == 2


# NOTE: the same sweep with its 3 jobs trained through the local executor took
# 56 s on an idle 2-core CPU and 91 to 171 s while other test suites ran, so
# this test submits them to the fake sbatch. test_two_train_jobs covers real
# training through the launcher.
@requires_slurm_registry
@requires_submitit
@pytest.mark.domainbed
def test_sweep_submits_then_skips_done(launcher_env, monkeypatch):
    write_fake_slurm(launcher_env / "fake-bin", launcher_env / "submission.sh")
    monkeypatch.setenv("PATH", "{}{}{}".format(launcher_env / "fake-bin", os.pathsep,
                                               os.environ["PATH"]))
    monkeypatch.setenv("JPS_SLURM_EXECUTOR", "slurm")
    monkeypatch.setenv("JPS_SLURM_WAIT", "0")
    sweep_dir = launcher_env / "sweep"
    arguments = ["launch", "--command_launcher", "slurm", "--datasets", "ColoredMNIST",
                 "--algorithms", "ERM", "--n_hparams", "1", "--n_trials", "1",
                 "--single_test_envs", "--steps", "3", "--hparams", TRAIN_HPARAMS,
                 "--data_dir", launcher_env / "data", "--output_dir", sweep_dir,
                 "--skip_confirmation"]

    launch = run_module("domainbed.scripts.sweep", *arguments, cwd=launcher_env)

    assert "Submitted 3 DomainBed jobs with the slurm executor" in launch.stdout
    assert "#SBATCH --array=0-2%3" in (launcher_env / "submission.sh").read_text()
    job_lists = list((launcher_env / "logs").glob("*/jobs.tsv"))
    assert len(job_lists) == 1
    commands = [row.split("\t", 1)[1] for row in job_lists[0].read_text().splitlines()[1:]]
    assert len(commands) == 3
    output_dirs = []
    for command in commands:
        words = shlex.split(command)
        assert words[:3] == ["python", "-m", "domainbed.scripts.train"]
        output_dirs.append(Path(words[words.index("--output_dir") + 1]))
    assert sorted(output_dirs) == sorted(path for path in sweep_dir.iterdir())

    # Mark the jobs as finished the way train.py does, then launch again.
    for output_dir in output_dirs:
        (output_dir / "done").write_text("done")
    relaunch = run_module("domainbed.scripts.sweep", *arguments, cwd=launcher_env)

    assert "3 jobs: 3 done, 0 incomplete, 0 not launched." in relaunch.stdout
    assert "slurm launcher: no commands to launch." in relaunch.stdout

"""DomainBed command launcher that submits each job to Slurm through submitit.

DomainBed's sweep finds this launcher through the entry point
``slurm = jps_domainbed.launchers:slurm_launcher`` in the group
``domainbed.command_launchers``, so the stock sweep runs unchanged::

    python -m domainbed.scripts.sweep launch ... --command_launcher slurm

Each command becomes one task of a Slurm job array, so a sweep is a single
``sbatch`` call. Environment variables named ``JPS_SLURM_*`` set the resources
(see ``SlurmSettings.from_env`` and docs/slurm.md). ``JPS_SLURM_EXECUTOR=local``
runs the same jobs as local processes through submitit's LocalExecutor, which
needs no cluster.
"""

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional

logger = logging.getLogger(__name__)

ENV_PREFIX = "JPS_SLURM_"
EXECUTORS = ("slurm", "local", "debug")
DEFAULT_TIME_MIN = 24 * 60
# DomainBed's datasets default to N_WORKERS = 8 data-loader workers.
DEFAULT_CPUS = 8
DEFAULT_GPUS = 1
DEFAULT_LOG_DIR = "slurm_logs"
JOB_NAME = "domainbed"
JOB_LIST_FILENAME = "jobs.tsv"
# Seconds between checks of the job states while waiting.
POLL_INTERVAL_S = {"slurm": 30.0, "local": 1.0, "debug": 0.0}
# Max number of job ids printed after submission. Longer lists are shortened
# to their first and last ids.
MAX_PRINTED_JOB_IDS = 10
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
INSTALL_HINT = "pip install submitit (or pip install 'jps-domainbed[slurm]')"
# sweep.py creates every output folder before it calls the launcher, and later
# launches only jobs without one. So a failed job, or a job of a launch that
# failed before submission, stays skipped until delete_incomplete runs.
NOT_SUBMITTED_HINT = ("No job was submitted, but the sweep has already created the jobs' "
                      "output folders. Run `python -m domainbed.scripts.sweep "
                      "delete_incomplete` with the same arguments before launching again.")
RELAUNCH_HINT = ("To rerun failed jobs once no job is running, run `python -m "
                 "domainbed.scripts.sweep delete_incomplete` and then `launch` with the "
                 "same arguments. Jobs with a 'done' file are kept.")


class SettingsError(ValueError):
    """A JPS_SLURM_* environment variable has an invalid value."""


class SlurmNotFoundError(RuntimeError):
    """The slurm executor is requested but sbatch or srun is not on PATH."""


class SubmissionError(RuntimeError):
    """sbatch rejected the submission, so no job was submitted."""


class CommandFailedError(RuntimeError):
    """A launched shell command exited with a non-zero status."""


class JobsFailedError(RuntimeError):
    """Error raised after all jobs of a launch finished and some failed.

    ``failures`` contains one JobFailure per failed job.
    """

    def __init__(self, message, failures):
        super().__init__(message)
        self.failures = failures


@dataclasses.dataclass(frozen=True)
class JobFailure:
    """One failed job: its id, command, a one-line reason and its submitit log files.

    The log paths are None for the debug executor, whose jobs print to the console.
    """

    job_id: str
    command: str
    reason: str
    stdout_path: Optional[Path]
    stderr_path: Optional[Path]


@dataclasses.dataclass(frozen=True)
class SlurmSettings:
    """Launcher settings, read from the JPS_SLURM_* environment variables."""

    executor: str = "slurm"
    partition: Optional[str] = None
    time_min: int = DEFAULT_TIME_MIN
    gpus: int = DEFAULT_GPUS
    cpus: int = DEFAULT_CPUS
    mem_gb: Optional[float] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    array_parallelism: Optional[int] = None
    log_dir: str = DEFAULT_LOG_DIR
    extra: Dict[str, object] = dataclasses.field(default_factory=dict)
    wait: bool = True

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "SlurmSettings":
        """Read and validate the settings. Unset or empty variables keep the defaults.

        Raises SettingsError naming the variable, its value and the fix.
        """
        environ = os.environ if environ is None else environ

        def read(suffix):
            value = environ.get(ENV_PREFIX + suffix, "").strip()
            return value or None

        executor = read("EXECUTOR") or cls.executor
        if executor not in EXECUTORS:
            raise SettingsError(
                "Invalid {}EXECUTOR={!r}: expected one of {}. Use 'slurm' to submit "
                "with sbatch, 'local' to run the jobs as local processes or 'debug' "
                "to run them one by one in this process.".format(
                    ENV_PREFIX, executor, ", ".join(EXECUTORS)))

        mem_gb = _parse_positive_number("MEM_GB", read("MEM_GB"))
        return cls(
            executor=executor,
            partition=read("PARTITION"),
            time_min=_parse_int("TIME", read("TIME"), cls.time_min, minimum=1,
                                unit="minutes"),
            gpus=_parse_int("GPUS", read("GPUS"), cls.gpus, minimum=0,
                            unit="GPUs per job"),
            cpus=_parse_int("CPUS", read("CPUS"), cls.cpus, minimum=1,
                            unit="CPUs per job"),
            mem_gb=mem_gb,
            account=read("ACCOUNT"),
            qos=read("QOS"),
            array_parallelism=_parse_int("ARRAY_PARALLELISM", read("ARRAY_PARALLELISM"),
                                         None, minimum=1, unit="jobs running at once"),
            log_dir=read("LOG_DIR") or cls.log_dir,
            extra=_parse_extra(read("EXTRA")),
            wait=_parse_bool("WAIT", read("WAIT"), cls.wait),
        )

    def executor_parameters(self) -> Dict[str, object]:
        """Return the keyword arguments for ``AutoExecutor.update_parameters``.

        Generic names apply to every executor. Names that start with ``slurm_``
        apply only to the slurm executor, and those from JPS_SLURM_EXTRA win.
        """
        parameters = {
            "name": JOB_NAME,
            "timeout_min": self.time_min,
            "nodes": 1,
            "tasks_per_node": 1,
            "cpus_per_task": self.cpus,
        }
        # Without gpus_per_node, Slurm allocates no GPU, so 0 is left out of the
        # sbatch file. The local executor needs the 0 to hide the machine's GPUs.
        if self.gpus > 0 or self.executor != "slurm":
            parameters["gpus_per_node"] = self.gpus
        if self.mem_gb is not None:
            parameters["mem_gb"] = self.mem_gb
        # NOTE: the local executor ignores these slurm_* names, so it starts
        # every job at once, regardless of JPS_SLURM_ARRAY_PARALLELISM.
        optional_slurm = {
            "slurm_partition": self.partition,
            "slurm_account": self.account,
            "slurm_qos": self.qos,
            "slurm_array_parallelism": self.array_parallelism,
        }
        parameters.update({key: value for key, value in optional_slurm.items()
                           if value is not None})
        parameters.update(self.extra)
        return parameters


def _parse_int(suffix, value, default, minimum, unit):
    if value is None:
        return default
    name = ENV_PREFIX + suffix
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise SettingsError(
            "Invalid {}={!r}: expected a whole number of {} that is at least {}, "
            "for example {}={}. Unset it to use the default.".format(
                name, value, unit, minimum, name, max(minimum, default or 1)))
    return number


def _parse_positive_number(suffix, value):
    if value is None:
        return None
    name = ENV_PREFIX + suffix
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is None or not number > 0 or number == float("inf"):
        raise SettingsError(
            "Invalid {}={!r}: expected a positive number of gigabytes, for example "
            "{}=32. Unset it to use the cluster's default memory.".format(name, value, name))
    return number


def _parse_bool(suffix, value, default):
    if value is None:
        return default
    word = value.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingsError(
        "Invalid {}{}={!r}: expected 1 or 0 (also accepted: {} or {}).".format(
            ENV_PREFIX, suffix, value, "/".join(TRUE_WORDS[1:]), "/".join(FALSE_WORDS[1:])))


def _parse_extra(value):
    if value is None:
        return {}
    name = ENV_PREFIX + "EXTRA"
    example = '{}=\'{{"slurm_constraint": "a100", "slurm_setup": ["module load cuda"]}}\''.format(
        name)
    try:
        extra = json.loads(value)
    except json.JSONDecodeError as error:
        raise SettingsError("Invalid JSON in {}={!r}: {}. Expected an object such as {}".format(
            name, value, error, example)) from error
    if not isinstance(extra, dict):
        raise SettingsError("Invalid {}={!r}: expected a JSON object, got a {}. Example: {}".format(
            name, value, type(extra).__name__, example))
    bad_keys = [key for key in extra if not key.startswith("slurm_")]
    if bad_keys:
        raise SettingsError(
            "Invalid key(s) {} in {}={!r}: every key must be a submitit Slurm "
            "parameter starting with 'slurm_', such as slurm_constraint or "
            "slurm_additional_parameters. Example: {}".format(
                ", ".join(map(repr, bad_keys)), name, value, example))
    return extra


class ShellCommand:
    """Picklable job function that runs one shell command in a fixed folder.

    The command's stdout and stderr go to the job's own streams, which submitit
    writes to the job's log files.
    """

    def __init__(self, command: str, cwd: str):
        self.command = command
        self.cwd = cwd

    def __call__(self) -> int:
        print("Running in {}: {}".format(self.cwd, self.command), flush=True)
        returncode = subprocess.run(self.command, shell=True, cwd=self.cwd).returncode
        if returncode != 0:
            raise CommandFailedError("command exited with status {}: {}".format(
                returncode, self.command))
        return returncode

    def __repr__(self):
        return "ShellCommand({!r}, cwd={!r})".format(self.command, self.cwd)


def _import_submitit():
    try:
        import submitit
    except ImportError as error:
        raise ImportError("The slurm command launcher needs submitit, which is not "
                          "installed: {}.".format(INSTALL_HINT)) from error
    return submitit


def _check_slurm_tools():
    # submitit submits with sbatch and starts each task with srun inside the job.
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise SlurmNotFoundError(
            "{prefix}EXECUTOR=slurm needs the Slurm commands sbatch and srun, but "
            "{missing} not found on PATH. Run the sweep on a Slurm login node, or set "
            "{prefix}EXECUTOR=local to run the jobs as local processes for a test "
            "run.".format(prefix=ENV_PREFIX, missing=" and ".join(missing)
                          + (" is" if len(missing) == 1 else " are")))


def _make_executor(submitit, settings, folder):
    executor = submitit.AutoExecutor(folder=folder, cluster=settings.executor)
    try:
        executor.update_parameters(**settings.executor_parameters())
    except NameError as error:
        # submitit raises NameError for unknown parameter names, which can only
        # come from JPS_SLURM_EXTRA because the other names are fixed here.
        raise SettingsError("Invalid key in {}EXTRA={!r}. submitit reported:\n{}".format(
            ENV_PREFIX, json.dumps(settings.extra), error)) from error
    return executor


def _launch_folder(log_dir):
    # One folder per launch keeps the logs of a sweep together, and stops the
    # local executor, whose job ids are process ids, from reading an old
    # result file of a reused id.
    stamp = "{}-{}".format(time.strftime("%Y%m%d-%H%M%S"), os.getpid())
    return (Path(log_dir) / stamp).resolve()


def _format_job_ids(job_ids):
    if len(job_ids) <= MAX_PRINTED_JOB_IDS:
        return " ".join(job_ids)
    half = MAX_PRINTED_JOB_IDS // 2
    return "{} ... {}".format(" ".join(job_ids[:half]), " ".join(job_ids[-half:]))


def _array_ids(job_ids):
    """Return the distinct Slurm job ids, without array task suffixes, for scancel."""
    return " ".join(dict.fromkeys(job_id.split("_")[0] for job_id in job_ids))


def _write_job_list(folder, jobs, commands):
    # The debug executor does not create the folder.
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / JOB_LIST_FILENAME
    lines = ["job_id\tcommand"]
    lines += ["{}\t{}".format(job.job_id, command) for job, command in zip(jobs, commands)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _failure_reason(error):
    """Extract a one-line failure reason from submitit's error text."""
    text = str(error)
    match = re.search(r"CommandFailedError: (.*)", text)
    if match:
        return match.group(1).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def _wait_for_jobs(jobs, commands, executor_name):
    """Wait for every job and return a JobFailure for each one that failed."""
    submitit = _import_submitit()
    by_job = {id(job): command for job, command in zip(jobs, commands)}
    failures = []

    if executor_name == "debug":
        # A debug job runs when it is first asked for its state. Its done()
        # and result() open pdb on an error, but exception() only returns it.
        finished = ((job, job.exception()) for job in jobs)
    else:
        finished = ((job, job.exception()) for job in submitit.helpers.as_completed(
            jobs, poll_frequency=POLL_INTERVAL_S[executor_name]))

    for count, (job, error) in enumerate(finished, start=1):
        if error is None:
            logger.info("Job %s succeeded (%d/%d finished)", job.job_id, count, len(jobs))
            continue
        has_logs = executor_name != "debug"
        failure = JobFailure(job_id=job.job_id, command=by_job[id(job)],
                             reason=_failure_reason(error),
                             stdout_path=job.paths.stdout if has_logs else None,
                             stderr_path=job.paths.stderr if has_logs else None)
        logger.warning("Job %s failed (%d/%d finished): %s", job.job_id, count, len(jobs),
                       failure.reason)
        failures.append(failure)
    return failures


def _failure_report(failures, total):
    lines = ["{} of {} DomainBed jobs failed. The other jobs ran to the end.".format(
        len(failures), total)]
    for failure in failures:
        lines.append("  job {}: {}".format(failure.job_id, failure.reason))
        if failure.stdout_path is None:
            lines.append("    output: printed above by the debug executor")
        else:
            lines += ["    stdout: {}".format(failure.stdout_path),
                      "    stderr: {}".format(failure.stderr_path)]
    lines.append(RELAUNCH_HINT)
    return "\n".join(lines)


def _submit(commands):
    """Submit the commands as one batch and return (settings, jobs, log folder)."""
    settings = SlurmSettings.from_env()
    submitit = _import_submitit()
    if settings.executor == "slurm":
        _check_slurm_tools()

    folder = _launch_folder(settings.log_dir)
    executor = _make_executor(submitit, settings, folder)
    cwd = os.getcwd()
    logger.info("Submitting %d commands with the %s executor, logs in %s",
                len(commands), settings.executor, folder)
    try:
        with executor.batch():
            jobs = [executor.submit(ShellCommand(command, cwd)) for command in commands]
    except submitit.core.utils.FailedJobError as error:
        # submitit raises this error, with sbatch's stderr, when sbatch fails.
        raise SubmissionError(
            "sbatch rejected the job array of {} jobs: {}\nFix the {}* setting that "
            "sbatch's error points to.".format(len(commands), error, ENV_PREFIX)) from error
    return settings, jobs, folder


def slurm_launcher(commands: List[str]) -> None:
    """Submit each command as one Slurm job through submitit, then wait for them.

    The settings come from the JPS_SLURM_* environment variables. With
    JPS_SLURM_WAIT=0 the function returns after submission. Otherwise it waits
    for every job, and raises JobsFailedError listing the failed jobs and their
    log files once all jobs have finished. A failed job does not stop the others.
    """
    commands = list(commands)
    if not commands:
        print("slurm launcher: no commands to launch.")
        return
    try:
        settings, jobs, folder = _submit(commands)
    except (SettingsError, ImportError, SlurmNotFoundError, SubmissionError) as error:
        error.args = ("{}\n{}".format(error, NOT_SUBMITTED_HINT),)
        raise
    job_ids = [job.job_id for job in jobs]
    job_list = _write_job_list(folder, jobs, commands)

    print("Submitted {} DomainBed jobs with the {} executor: {}".format(
        len(jobs), settings.executor, _format_job_ids(job_ids)))
    print("Job logs: {} (job ids and commands: {})".format(folder, job_list))

    wait = settings.wait
    if not wait and settings.executor == "debug":
        logger.warning("%sWAIT=0 is ignored by the debug executor, whose jobs run "
                       "only while the launcher waits", ENV_PREFIX)
        wait = True
    if not wait:
        print("Not waiting for the jobs ({}WAIT=0). {}".format(ENV_PREFIX, RELAUNCH_HINT))
        if settings.executor == "slurm":
            print("Cancel them with `scancel {}` if needed.".format(_array_ids(job_ids)))
        return

    print("Waiting for {} jobs. Set {}WAIT=0 to return right after submission.".format(
        len(jobs), ENV_PREFIX), flush=True)
    try:
        failures = _wait_for_jobs(jobs, commands, settings.executor)
    except KeyboardInterrupt:
        if settings.executor == "slurm":
            print("Stopped waiting. The Slurm jobs keep running. Cancel them with "
                  "`scancel {}` if needed.".format(_array_ids(job_ids)), file=sys.stderr)
        raise

    if failures:
        raise JobsFailedError(_failure_report(failures, len(jobs)), failures)
    print("All {} DomainBed jobs succeeded.".format(len(jobs)))

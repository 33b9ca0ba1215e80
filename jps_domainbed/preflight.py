"""Check a DomainBed sweep's settings before launching it.

``python -m jps_domainbed.preflight`` takes the sweep's own options and
checks, for every job the sweep would run, what would otherwise fail hours
later or hang:

- the data is where DomainBed will read it (MNIST files, image folders);
- every environment's in-split contains at least ``batch_size`` examples,
  because DomainBed's ``InfiniteDataLoader`` never yields otherwise and the
  job spins at full CPU without an error;
- ``python`` on PATH, which the sweep uses for every job, imports
  DomainBed and this package;
- for JPS, ``jps_k`` fits the candidate weights of the encoder, and the
  patch size divides the image size.

It exits 0 when every check passes and 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

MNIST_DATASETS = ("RotatedMNIST", "ColoredMNIST")
CLIP_ALGORITHMS = ("JPS", "CLIP_ERM", "CLIP_LinearProbe")


def sweep_hparams(algorithm: str, dataset: str, n_hparams_from: int, n_hparams: int,
                  n_trials: int, overrides: Optional[dict]) -> Iterator[Tuple[int, int, dict]]:
    """Yield (hparams_seed, trial_seed, hparams) as DomainBed's train.py builds them."""
    from domainbed import hparams_registry
    from domainbed.lib import misc

    for trial_seed in range(n_trials):
        for hparams_seed in range(n_hparams_from, n_hparams):
            if hparams_seed == 0:
                hparams = hparams_registry.default_hparams(algorithm, dataset)
            else:
                hparams = hparams_registry.random_hparams(
                    algorithm, dataset, misc.seed_hash(hparams_seed, trial_seed))
            if overrides:
                hparams.update(overrides)
            yield hparams_seed, trial_seed, hparams


def environment_sizes(dataset: str, data_dir: str) -> List[int]:
    """Return the number of examples in each environment of ``dataset``."""
    from domainbed import datasets

    if dataset in MNIST_DATASETS:
        from .mnist_data import check_mnist_dir

        counts = check_mnist_dir(data_dir)
        total = counts["train"] + counts["test"]
        num_envs = len(datasets.get_dataset_class(dataset).ENVIRONMENTS)
        # DomainBed deals the shuffled digits round-robin to the environments.
        return [len(range(env, total, num_envs)) for env in range(num_envs)]

    dataset_class = datasets.get_dataset_class(dataset)
    hparams = {"data_augmentation": False}
    try:
        instance = dataset_class(data_dir, [0], hparams)
    except (FileNotFoundError, OSError, RuntimeError) as error:
        raise FileNotFoundError(
            f"DomainBed could not read dataset {dataset} under {data_dir} ({error}); "
            f"download it with `python -m domainbed.scripts.download --data_dir {data_dir}`") from error
    return [len(env) for env in instance]


def candidate_count(model_name: str, patterns: str) -> Optional[int]:
    """Return the number of c_fc weights of an open_clip ViT, or None if unknown."""
    if patterns.strip() != "*.mlp.c_fc.weight":
        return None
    from .clip_featurizer import check_model_name

    vision = check_model_name(model_name)["vision_cfg"]
    if "layers" not in vision or "width" not in vision or isinstance(vision["layers"], list):
        return None
    width = int(vision["width"])
    hidden = int(width * float(vision.get("mlp_ratio", 4.0)))
    return int(vision["layers"]) * hidden * width


def check_clip_hparams(dataset: str, hparams: dict) -> List[str]:
    """Return problems with the encoder, its weights and the head settings."""
    from .algorithms import clip_spec_from_hparams
    from .class_names import has_class_names
    from .clip_featurizer import (PretrainedWeightsNotFoundError, check_image_size,
                                  resolve_weights)

    problems = []
    spec = clip_spec_from_hparams(hparams)
    try:
        check_image_size(spec.model_name, spec.image_size)
        # Looks on disk only; it downloads nothing.
        resolve_weights(spec)
    except (ValueError, PretrainedWeightsNotFoundError) as error:
        problems.append(f"{error} (hparams clip_model, clip_pretrained, clip_image_size, "
                        "clip_weights_file, clip_cache_dir)")
    head_init = hparams.get("head_init")
    if head_init not in ("random", "zeroshot"):
        problems.append(f"head_init must be 'random' or 'zeroshot', got {head_init!r}")
    elif head_init == "zeroshot" and not has_class_names(dataset):
        problems.append(f"head_init='zeroshot' needs class names, which are unknown for "
                        f"{dataset}; set head_init to 'random'")
    return problems


def check_jps_hparams(hparams: dict) -> List[str]:
    """Return problems with the selection and update settings of JPS."""
    from .algorithms import check_update_implementation, selection_config_from_hparams

    try:
        selection_config_from_hparams(hparams).validate()
        check_update_implementation(str(hparams.get("jps_update", "sparse")))
    except ValueError as error:
        return [f"{error} (hparams jps_k, jps_rho, jps_variance, jps_selection_batches, "
                "jps_candidates, jps_update)"]
    return []


def check_job(algorithm: str, dataset: str, hparams: dict, sizes: Sequence[int],
              holdout_fraction: float, steps: Optional[int] = None) -> List[str]:
    """Return the problems of one job's settings (empty when it can run)."""
    problems = []
    batch_size = int(hparams["batch_size"])
    for env, size in enumerate(sizes):
        in_split = size - int(size * holdout_fraction)
        if in_split < batch_size:
            problems.append(
                f"environment {env} of {dataset} has {in_split} training examples "
                f"(in-split), fewer than batch_size={batch_size}; DomainBed's "
                f"InfiniteDataLoader would never yield. Lower batch_size to at most {in_split}")

    if algorithm in CLIP_ALGORITHMS:
        problems.extend(check_clip_hparams(dataset, hparams))
        if problems:
            return problems
    if algorithm == "JPS":
        problems.extend(check_jps_hparams(hparams))
        count = candidate_count(str(hparams["clip_model"]), str(hparams["jps_candidates"]))
        if count is not None and int(hparams["jps_k"]) > count:
            problems.append(
                f"jps_k={hparams['jps_k']} is larger than the {count} c_fc weights of "
                f"{hparams['clip_model']}; lower jps_k")
        selection_batches = int(hparams["jps_selection_batches"])
        if steps is not None and steps < selection_batches:
            problems.append(
                f"--steps {steps} is fewer than jps_selection_batches={selection_batches}, so "
                "JPS would never select its mask nor train; raise --steps")
    return problems


def check_job_interpreter() -> List[str]:
    """Return a problem unless ``python`` on PATH imports DomainBed and this package.

    DomainBed's sweep starts every job as ``python -m domainbed.scripts.train``
    and its local launcher ignores a job's failure, so a wrong ``python``
    would make every job fail silently.
    """
    executable = shutil.which("python")
    if executable is None:
        return ["no `python` on PATH, but DomainBed's sweep starts every job as "
                "`python -m domainbed.scripts.train`; activate the environment "
                "that has jps-domainbed installed"]
    result = subprocess.run([executable, "-c", "import domainbed.algorithms, jps_domainbed"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"`python` on PATH ({executable}) cannot import DomainBed and jps_domainbed "
                f"({last_line}), but DomainBed's sweep starts every job with it; activate "
                "the environment that has them (for example `. .venv/bin/activate`)"]
    return []


def run_checks(data_dir: str, dataset_names: Sequence[str], algorithm_names: Sequence[str],
               n_hparams_from: int = 0, n_hparams: int = 1, n_trials: int = 1,
               holdout_fraction: float = 0.2, overrides: Optional[dict] = None,
               steps: Optional[int] = None) -> List[str]:
    """Return every problem found across the sweep's jobs, without duplicates."""
    problems: Dict[str, None] = dict.fromkeys(check_job_interpreter())
    for dataset in dataset_names:
        try:
            sizes = environment_sizes(dataset, data_dir)
        except (FileNotFoundError, ValueError) as error:
            problems[str(error)] = None
            continue
        logger.info("%s: environment sizes %s", dataset, sizes)
        for algorithm in algorithm_names:
            for hparams_seed, trial_seed, hparams in sweep_hparams(
                    algorithm, dataset, n_hparams_from, n_hparams, n_trials, overrides):
                for problem in check_job(algorithm, dataset, hparams, sizes, holdout_fraction,
                                         steps):
                    problems[f"{algorithm} (hparams_seed {hparams_seed}, trial {trial_seed}): "
                             f"{problem}"] = None
    return list(problems)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jps_domainbed.preflight",
        description="Check a DomainBed sweep's data and hyperparameters before launching it. "
                    "Takes the sweep's options; those not listed here are ignored.")
    parser.add_argument("--data_dir", required=True, help="DomainBed data folder")
    parser.add_argument("--datasets", nargs="+", required=True)
    parser.add_argument("--algorithms", nargs="+", required=True)
    parser.add_argument("--n_hparams_from", type=int, default=0)
    parser.add_argument("--n_hparams", type=int, default=20,
                        help="hyperparameter seeds n_hparams_from..n_hparams-1, as in the sweep")
    parser.add_argument("--n_trials", type=int, default=3)
    parser.add_argument("--holdout_fraction", type=float, default=0.2,
                        help="fraction of each environment held out for validation")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per job; when given, checks that JPS gets "
                             "past its selection (not checked when left out)")
    parser.add_argument("--hparams", type=str, default=None,
                        help="JSON object of hyperparameters that override the registry's")
    args, unknown = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if unknown:
        logger.info("ignoring sweep options not checked here: %s", " ".join(unknown))

    overrides = None
    if args.hparams:
        try:
            overrides = json.loads(args.hparams)
        except json.JSONDecodeError as error:
            print(f"preflight: --hparams is not valid JSON ({error}): {args.hparams}", file=sys.stderr)
            return 1
    problems = run_checks(args.data_dir, args.datasets, args.algorithms, args.n_hparams_from,
                          args.n_hparams, args.n_trials, args.holdout_fraction, overrides,
                          args.steps)
    if problems:
        print(f"preflight: {len(problems)} problem(s) found, nothing launched:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"preflight: OK ({', '.join(args.datasets)} x {', '.join(args.algorithms)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

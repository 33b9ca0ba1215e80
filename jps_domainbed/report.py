"""Write Markdown, LaTeX and PNG reports for a DomainBed sweep.

Usage::

    python -m jps_domainbed.report --input_dir SWEEP_DIR --output_dir OUT_DIR

The measured accuracies come from DomainBed's own code: ``reporting.load_records``,
``reporting.get_grouped_records``, the selection methods' ``sweep_acc`` and
``collect_results.format_mean``. Every measured cell is therefore the number that
``python -m domainbed.scripts.collect_results --input_dir SWEEP_DIR`` prints for
the same records. Datasets missing from ``domainbed.datasets.DATASETS``, which
collect_results skips, are reported too. Published accuracies from ``data/reference_results.csv`` are
added as rows marked "(published)".
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import logging
import os
import sys
import types
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

logger = logging.getLogger(__name__)

# The five datasets behind the published "Avg" column of reference_results.csv.
REFERENCE_DATASETS = ("PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet")
DEFAULT_REFERENCE_CSV = Path(__file__).resolve().parent / "data" / "reference_results.csv"
REPORT_FILES = ("report.md", "report.tex", "report.png")

TRAINING_DOMAIN_VALIDATION = "training-domain validation"
ORACLE = "test-domain validation (oracle)"

SWEEP_MARK = "(this sweep)"
PUBLISHED_MARK = "(published)"

# Keys of the "Missing" section, in the order they are reported.
MISSING_CATEGORIES = (
    "Jobs without results.jsonl",
    "Jobs without a done file (still running or failed)",
    "Unreadable lines in results.jsonl",
    "Datasets without records",
    "Missing test domains",
    "Missing trials",
    "Missing hyperparameter seeds",
)


# --------------------------------------------------------------------------
# DomainBed access


def import_domainbed() -> types.SimpleNamespace:
    """Import the DomainBed modules the report reuses.

    Raises RuntimeError with an installation hint when DomainBed is absent.
    """
    try:
        from domainbed import algorithms, datasets, model_selection
        from domainbed.lib import reporting
        from domainbed.lib.query import Q
        from domainbed.scripts import collect_results
    except ImportError as error:
        raise RuntimeError(
            f"DomainBed is not importable ({error}). Install the patched "
            "DomainBed checkout into this environment, or put a DomainBed "
            "checkout on PYTHONPATH, then rerun."
        ) from error
    return types.SimpleNamespace(
        algorithms=algorithms,
        datasets=datasets,
        model_selection=model_selection,
        reporting=reporting,
        collect_results=collect_results,
        Q=Q,
    )


def selection_methods(db: types.SimpleNamespace) -> List[tuple]:
    """Return (label, DomainBed selection method class) pairs, in report order."""
    return [
        (TRAINING_DOMAIN_VALIDATION, db.model_selection.IIDAccuracySelectionMethod),
        (ORACLE, db.model_selection.OracleSelectionMethod),
    ]


# --------------------------------------------------------------------------
# Table model


@dataclasses.dataclass
class Cell:
    """One table cell. Accuracies and errors are in percent."""

    mean: Optional[float] = None
    error: Optional[float] = None
    # Shown when mean is None: "X" for a missing measurement, "" for no published number.
    placeholder: str = ""
    # True for a published average recomputed over the datasets shown.
    recomputed: bool = False

    def render(self, plus_minus: str, dagger: str) -> str:
        if self.mean is None:
            return self.placeholder
        text = "{:.1f}".format(self.mean)
        if self.error is not None:
            text += " {} {:.1f}".format(plus_minus, self.error)
        if self.recomputed:
            text += dagger
        return text


@dataclasses.dataclass
class Row:
    label: str
    cells: List[Cell]
    published: bool = False
    footnote: Optional[int] = None


@dataclasses.dataclass
class Table:
    title: str
    columns: List[str]
    rows: List[Row]


@dataclasses.dataclass
class Section:
    """Tables for one model selection method."""

    selection_label: str
    dataset_tables: List[Table]
    overall_table: Table


@dataclasses.dataclass
class Report:
    input_dir: str
    record_count: int
    job_counts: Dict[str, int]
    sections: List[Section]
    footnotes: List[str]
    missing: Dict[str, List[str]]


# --------------------------------------------------------------------------
# Published results


@dataclasses.dataclass(frozen=True)
class ReferenceResult:
    """One row of reference_results.csv. Accuracies are in percent."""

    algorithm: str
    backbone: str
    selection_method: str
    accuracies: Dict[str, float]
    average: Optional[float]
    source: str
    year: str
    table: str
    retrieved_from: str
    notes: str

    def citation(self) -> str:
        parts = [self.source]
        if self.year:
            parts.append(self.year)
        if self.retrieved_from and self.retrieved_from != self.source:
            parts.append("read from " + self.retrieved_from)
        return ", ".join(parts)


def _parse_percent(text: str, path: Path, line_number: int, column: str) -> Optional[float]:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"{path}:{line_number}: column {column!r} must be an accuracy in % "
            f"or empty, got {text!r}"
        ) from None


def load_reference_results(path: Optional[Path] = None) -> List[ReferenceResult]:
    """Read published accuracies (%) from a CSV with the reference_results.csv columns.

    Raises FileNotFoundError for a missing file and ValueError for a missing
    column or a cell that is not a number.
    """
    path = Path(path) if path is not None else DEFAULT_REFERENCE_CSV
    required = {"algorithm", "backbone", "selection_method", "Avg", "source"}
    results = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        absent = required - set(reader.fieldnames or [])
        if absent:
            raise ValueError(f"{path}: missing column(s) {sorted(absent)}")
        for line_number, row in enumerate(reader, start=2):
            accuracies = {}
            for dataset in REFERENCE_DATASETS:
                value = _parse_percent(row.get(dataset), path, line_number, dataset)
                if value is not None:
                    accuracies[dataset] = value
            results.append(
                ReferenceResult(
                    algorithm=row["algorithm"].strip(),
                    backbone=(row.get("backbone") or "").strip(),
                    selection_method=row["selection_method"].strip(),
                    accuracies=accuracies,
                    average=_parse_percent(row["Avg"], path, line_number, "Avg"),
                    source=row["source"].strip(),
                    year=(row.get("year") or "").strip(),
                    table=(row.get("table") or "").strip(),
                    retrieved_from=(row.get("retrieved_from") or "").strip(),
                    notes=(row.get("notes") or "").strip(),
                )
            )
    return results


class FootnoteRegistry:
    """Numbers each distinct citation once, in order of first use."""

    def __init__(self) -> None:
        self._numbers: Dict[str, int] = {}

    def number(self, citation: str) -> int:
        if citation not in self._numbers:
            self._numbers[citation] = len(self._numbers) + 1
        return self._numbers[citation]

    def notes(self) -> List[str]:
        return [f"[{number}] {citation}" for citation, number in self._numbers.items()]


def _published_label(reference: ReferenceResult, footnote: int) -> str:
    name = reference.algorithm
    if reference.backbone:
        name += ", " + reference.backbone
    return f"{name} {PUBLISHED_MARK} [{footnote}]"


# --------------------------------------------------------------------------
# Sweep directory scan


@dataclasses.dataclass
class JobStatus:
    """State of one job directory of the sweep."""

    directory: Path
    has_results: bool
    done: bool
    records: List[dict]
    unreadable_lines: int

    def describe(self) -> str:
        if not self.records:
            return str(self.directory)
        last = self.records[-1]
        args = last.get("args", {})
        return (
            f"{self.directory} (dataset {args.get('dataset')}, algorithm "
            f"{args.get('algorithm')}, test_envs {args.get('test_envs')}, "
            f"hparams_seed {args.get('hparams_seed')}, trial_seed "
            f"{args.get('trial_seed')}; last checkpoint at step {last.get('step')})"
        )


def scan_jobs(input_dir: Path) -> List[JobStatus]:
    """Read every job directory of a sweep, skipping lines that are not valid JSON."""
    jobs = []
    for entry in sorted(os.scandir(input_dir), key=lambda item: item.name):
        if not entry.is_dir():
            continue
        directory = Path(entry.path)
        results_path = directory / "results.jsonl"
        records, unreadable = [], 0
        if results_path.is_file():
            with open(results_path, encoding="utf-8") as handle:
                for line in handle:
                    if not line.strip():
                        continue
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        unreadable += 1
        jobs.append(
            JobStatus(
                directory=directory,
                has_results=results_path.is_file(),
                done=(directory / "done").exists(),
                records=records,
                unreadable_lines=unreadable,
            )
        )
    return jobs


def load_sweep_records(db: types.SimpleNamespace, input_dir: Path, jobs: Sequence[JobStatus]):
    """Load records with DomainBed's reporting.load_records.

    load_records raises on a partly written line, for example while a job is
    writing a checkpoint. The report then uses the lines that scan_jobs could
    parse, and lists the skipped ones under "Missing".
    """
    try:
        return db.reporting.load_records(str(input_dir))
    except json.JSONDecodeError as error:
        logger.warning(
            "reporting.load_records failed on %s (%s). Using only the lines that parse as JSON",
            input_dir,
            error,
        )
        return db.Q([record for job in jobs for record in job.records])


# --------------------------------------------------------------------------
# Table construction


def _environment_names(db: types.SimpleNamespace, dataset: str, records) -> List[str]:
    if dataset in db.datasets.DATASETS:
        return list(db.datasets.get_dataset_class(dataset).ENVIRONMENTS)
    # Datasets unknown to this DomainBed: count the envN_out_acc keys.
    count = 0
    for record in records:
        if record["args"]["dataset"] != dataset:
            continue
        while f"env{count}_out_acc" in record:
            count += 1
    return [f"env{index}" for index in range(count)]


def _ordered_datasets(db: types.SimpleNamespace, records, requested: Optional[Sequence[str]]) -> List[str]:
    present = set(records.select("args.dataset").unique())
    # collect_results prints the datasets in domainbed.datasets.DATASETS order.
    known = [name for name in db.datasets.DATASETS if name in present]
    unknown = sorted(present - set(db.datasets.DATASETS))
    for name in unknown:
        logger.warning(
            "dataset %s is not in domainbed.datasets.DATASETS, so collect_results "
            "skips it. This report names its test domains env0, env1, ...",
            name,
        )
    ordered = known + unknown
    if requested:
        ordered = [name for name in ordered if name in requested]
    return ordered


def _ordered_algorithms(db: types.SimpleNamespace, records) -> List[str]:
    names = list(records.select("args.algorithm").unique())
    registered = [name for name in db.algorithms.ALGORITHMS if name in names]
    return registered + [name for name in names if name not in db.algorithms.ALGORITHMS]


def _measured_cell(db: types.SimpleNamespace, accuracies) -> Cell:
    # format_mean returns 100 * mean and 100 * np.std(ddof=0) / sqrt(n).
    mean, error, _ = db.collect_results.format_mean(accuracies, False)
    if mean is None:
        return Cell(placeholder="X")
    return Cell(mean=float(mean), error=float(error))


def _average_cell(cells: Sequence[Cell]) -> Cell:
    means = [cell.mean for cell in cells]
    if any(mean is None for mean in means):
        return Cell(placeholder="X")
    return Cell(mean=sum(means) / len(means))


def grouped_sweep_accuracies(db: types.SimpleNamespace, records, selection_method):
    """Return collect_results' groups with their selected test accuracy (fraction)."""
    grouped = db.reporting.get_grouped_records(records)
    return grouped.map(
        lambda group: {**group, "sweep_acc": selection_method.sweep_acc(group["records"])}
    ).filter(lambda group: group["sweep_acc"] is not None)


def build_dataset_table(
    db, grouped, dataset, environments, algorithm_names, references, footnotes, selection_label
) -> Table:
    rows = []
    for algorithm in algorithm_names:
        cells = []
        for test_env in range(len(environments)):
            accuracies = grouped.filter_equals(
                "dataset, algorithm, test_env", (dataset, algorithm, test_env)
            ).select("sweep_acc")
            cells.append(_measured_cell(db, accuracies))
        cells.append(_average_cell(cells))
        rows.append(Row(label=f"{algorithm} {SWEEP_MARK}", cells=cells))

    for reference in references:
        if reference.selection_method != selection_label:
            continue
        value = reference.accuracies.get(dataset)
        if value is None:
            continue
        footnote = footnotes.number(reference.citation())
        cells = [Cell() for _ in environments] + [Cell(mean=value)]
        rows.append(
            Row(label=_published_label(reference, footnote), cells=cells, published=True, footnote=footnote)
        )

    return Table(
        title=f"{dataset}, {selection_label}",
        columns=list(environments) + ["Avg"],
        rows=rows,
    )


def _published_average(reference: ReferenceResult, dataset_names: Sequence[str]) -> Cell:
    if set(dataset_names) == set(REFERENCE_DATASETS) and reference.average is not None:
        return Cell(mean=reference.average)
    values = [reference.accuracies.get(name) for name in dataset_names]
    if dataset_names and all(value is not None for value in values):
        return Cell(mean=sum(values) / len(values), recomputed=True)
    return Cell()


def build_overall_table(
    db, grouped, dataset_names, algorithm_names, references, footnotes, selection_label
) -> Table:
    rows = []
    for algorithm in algorithm_names:
        cells = []
        for dataset in dataset_names:
            # Same as collect_results: average the test domains of each trial
            # first, then take mean and error over trials.
            trial_averages = (
                grouped.filter_equals("algorithm, dataset", (algorithm, dataset))
                .group("trial_seed")
                .map(lambda trial_seed, group: group.select("sweep_acc").mean())
            )
            cells.append(_measured_cell(db, trial_averages))
        cells.append(_average_cell(cells))
        rows.append(Row(label=f"{algorithm} {SWEEP_MARK}", cells=cells))

    for reference in references:
        if reference.selection_method != selection_label:
            continue
        cells = [
            Cell(mean=reference.accuracies[name]) if name in reference.accuracies else Cell()
            for name in dataset_names
        ]
        cells.append(_published_average(reference, dataset_names))
        if all(cell.mean is None for cell in cells):
            continue
        footnote = footnotes.number(reference.citation())
        rows.append(
            Row(label=_published_label(reference, footnote), cells=cells, published=True, footnote=footnote)
        )

    return Table(
        title=f"Average over test domains, {selection_label}",
        columns=list(dataset_names) + ["Avg"],
        rows=rows,
    )


# --------------------------------------------------------------------------
# Missing results


def find_missing(
    jobs: Sequence[JobStatus],
    records,
    dataset_names: Sequence[str],
    environments: Dict[str, List[str]],
    algorithm_names: Sequence[str],
    requested_datasets: Optional[Sequence[str]],
) -> Dict[str, List[str]]:
    """List what a complete sweep would contain but this one lacks.

    Completeness is judged against the sweep itself: every algorithm on every
    test domain of every dataset, with every trial seed and every hparams seed
    that appears anywhere for that dataset and algorithm. Only single test
    domain jobs count, because both selection methods in the report use only
    those. Jobs with two test domains (used by leave-one-domain-out selection)
    are neither required nor reported.
    """
    missing: Dict[str, List[str]] = {category: [] for category in MISSING_CATEGORIES}

    for job in jobs:
        if not job.has_results:
            missing["Jobs without results.jsonl"].append(
                f"{job.directory}: not started, or failed before its first checkpoint"
            )
        elif not job.done:
            missing["Jobs without a done file (still running or failed)"].append(job.describe())
        if job.unreadable_lines:
            missing["Unreadable lines in results.jsonl"].append(
                f"{job.directory / 'results.jsonl'}: {job.unreadable_lines} line(s) skipped"
            )

    for name in requested_datasets or []:
        if name not in dataset_names:
            missing["Datasets without records"].append(name)

    trial_seeds = sorted({record["args"]["trial_seed"] for record in records})
    trials_present = collections.defaultdict(set)
    hparams_present = collections.defaultdict(set)
    hparams_expected = collections.defaultdict(set)
    for record in records:
        args = record["args"]
        if len(args["test_envs"]) != 1:
            continue
        key = (args["dataset"], args["algorithm"], args["test_envs"][0])
        trials_present[key].add(args["trial_seed"])
        hparams_present[key + (args["trial_seed"],)].add(args["hparams_seed"])
        hparams_expected[(args["dataset"], args["algorithm"])].add(args["hparams_seed"])

    for dataset in dataset_names:
        for algorithm in algorithm_names:
            names = environments[dataset]
            if not any(trials_present[(dataset, algorithm, index)] for index in range(len(names))):
                missing["Missing test domains"].append(
                    f"{dataset}, {algorithm}: no results for any test domain"
                )
                continue
            for index, env_name in enumerate(names):
                domain = f"{dataset}, {algorithm}, test domain {env_name} (env {index})"
                present = trials_present[(dataset, algorithm, index)]
                if not present:
                    missing["Missing test domains"].append(f"{domain}: no results")
                    continue
                absent_trials = [seed for seed in trial_seeds if seed not in present]
                if absent_trials:
                    missing["Missing trials"].append(
                        f"{domain}: trial seed(s) {_join(absent_trials)}"
                    )
                for trial_seed in sorted(present):
                    absent_hparams = sorted(
                        hparams_expected[(dataset, algorithm)]
                        - hparams_present[(dataset, algorithm, index, trial_seed)]
                    )
                    if absent_hparams:
                        missing["Missing hyperparameter seeds"].append(
                            f"{domain}, trial seed {trial_seed}: hparams seed(s) {_join(absent_hparams)}"
                        )
    return {category: lines for category, lines in missing.items() if lines}


def _join(values: Iterable) -> str:
    return ", ".join(str(value) for value in values)


# --------------------------------------------------------------------------
# Report assembly


def build_report(
    input_dir: Path,
    references: Sequence[ReferenceResult] = (),
    datasets: Optional[Sequence[str]] = None,
    db: Optional[types.SimpleNamespace] = None,
) -> Report:
    """Compute every table of the report. Requires DomainBed."""
    db = db or import_domainbed()
    input_dir = Path(input_dir)
    jobs = scan_jobs(input_dir)
    records = load_sweep_records(db, input_dir, jobs)
    if datasets:
        records = records.filter(lambda record: record["args"]["dataset"] in datasets)

    dataset_names = _ordered_datasets(db, records, datasets)
    algorithm_names = _ordered_algorithms(db, records)
    environments = {name: _environment_names(db, name, records) for name in dataset_names}

    footnotes = FootnoteRegistry()
    sections = []
    for selection_label, method in selection_methods(db):
        grouped = grouped_sweep_accuracies(db, records, method)
        dataset_tables = [
            build_dataset_table(
                db, grouped, name, environments[name], algorithm_names,
                references, footnotes, selection_label,
            )
            for name in dataset_names
        ]
        overall = build_overall_table(
            db, grouped, dataset_names, algorithm_names, references, footnotes, selection_label
        )
        sections.append(Section(selection_label, dataset_tables, overall))

    job_counts = {
        "jobs": len(jobs),
        "done": sum(job.done for job in jobs),
        "without done": sum(job.has_results and not job.done for job in jobs),
        "without results": sum(not job.has_results for job in jobs),
    }
    return Report(
        input_dir=str(input_dir),
        record_count=len(records),
        job_counts=job_counts,
        sections=sections,
        footnotes=footnotes.notes(),
        missing=find_missing(jobs, records, dataset_names, environments, algorithm_names, datasets),
    )


# --------------------------------------------------------------------------
# Markdown


CELL_EXPLANATION = (
    "Cells are test-domain accuracy in %, as mean ± error over trial seeds. "
    "The error is the one DomainBed's collect_results prints: np.std over trials "
    "(ddof=0) divided by the square root of the number of trials, i.e. a standard "
    "error. Avg is the mean of the columns to its left, without an error term. "
    '"X" marks a cell without results. Published rows have empty cells where the '
    "source gives no number."
)
RECOMPUTED_EXPLANATION = (
    "Published Avg is the published five-dataset average "
    f"({', '.join(REFERENCE_DATASETS)}) when this report shows exactly those datasets; "
    "otherwise it is recomputed over the datasets shown and marked †."
)
MISSING_NOTE = (
    "Tables include the checkpoints that unfinished jobs have written so far, as "
    "collect_results does."
)


def _row_marks_explanation(report: Report) -> str:
    text = f'Rows marked "{SWEEP_MARK}" are measured in this sweep.'
    if report.footnotes:
        text += f' Rows marked "{PUBLISHED_MARK}" are copied from the source in their footnote.'
    return text


def _markdown_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown_table(table: Table) -> List[str]:
    header = ["Algorithm"] + table.columns
    lines = [
        "| " + " | ".join(_markdown_escape(label) for label in header) + " |",
        "|" + "---|" + "---:|" * len(table.columns),
    ]
    for row in table.rows:
        cells = [_markdown_escape(row.label)] + [cell.render("±", "†") for cell in row.cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: Report) -> str:
    counts = report.job_counts
    lines = [
        "# DomainBed sweep report",
        "",
        f"Sweep directory: `{report.input_dir}`",
        "",
        f"{report.record_count} records from {counts['jobs']} job directories: "
        f"{counts['done']} done, {counts['without done']} without a done file, "
        f"{counts['without results']} without results.jsonl.",
        "",
        CELL_EXPLANATION,
        _row_marks_explanation(report),
        "",
    ]
    if not report.record_count:
        lines += ["No records found, so the tables below are empty.", ""]
    for section in report.sections:
        lines += [f"## Model selection: {section.selection_label}", ""]
        for table in section.dataset_tables:
            lines += [f"### {table.title}", ""] + render_markdown_table(table) + [""]
        lines += [f"### {section.overall_table.title}", ""]
        lines += render_markdown_table(section.overall_table) + [""]
    if report.footnotes:
        lines += ["## Sources of published rows", ""]
        lines += [f"- {note}" for note in report.footnotes]
        lines += ["", RECOMPUTED_EXPLANATION, ""]
    lines += ["## Missing", ""]
    if report.missing:
        lines += [MISSING_NOTE, ""]
        for category, items in report.missing.items():
            lines += [f"### {category}", ""] + [f"- {item}" for item in items] + [""]
    else:
        lines += ["Nothing is missing: every algorithm has every test domain, trial seed and hparams seed.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# LaTeX

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "†": r"$^\dagger$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(character, character) for character in text)


def render_latex_table(table: Table) -> List[str]:
    lines = [
        r"\begin{table}[ht]",
        r"\centering",
        r"\caption{" + latex_escape(table.title) + "}",
        r"\begin{adjustbox}{max width=\textwidth}",
        r"\begin{tabular}{l" + "c" * len(table.columns) + "}",
        r"\toprule",
        " & ".join(latex_escape(label) for label in ["Algorithm"] + table.columns) + r" \\",
        r"\midrule",
    ]
    for row in table.rows:
        cells = [latex_escape(row.label)] + [
            cell.render(r"$\pm$", r"$^\dagger$") for cell in row.cells
        ]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{adjustbox}", r"\end{table}", ""]
    return lines


def render_latex(report: Report) -> str:
    counts = report.job_counts
    lines = [
        r"\documentclass{article}",
        r"\usepackage[T1]{fontenc}",
        r"\usepackage[utf8]{inputenc}",
        r"\usepackage{booktabs}",
        r"\usepackage{adjustbox}",
        r"\begin{document}",
        r"\section*{DomainBed sweep report}",
        "Sweep directory: " + r"\texttt{" + latex_escape(report.input_dir) + "}.",
        "",
        latex_escape(
            f"{report.record_count} records from {counts['jobs']} job directories: "
            f"{counts['done']} done, {counts['without done']} without a done file, "
            f"{counts['without results']} without results.jsonl."
        ),
        "",
        latex_escape(CELL_EXPLANATION),
        latex_escape(_row_marks_explanation(report)),
        "",
    ]
    for section in report.sections:
        lines += [r"\section*{Model selection: " + latex_escape(section.selection_label) + "}", ""]
        for table in section.dataset_tables + [section.overall_table]:
            lines += render_latex_table(table)
        lines.append(r"\clearpage")
    if report.footnotes:
        lines += [r"\section*{Sources of published rows}", r"\begin{itemize}"]
        lines += [r"\item " + latex_escape(note) for note in report.footnotes]
        lines += [r"\end{itemize}", latex_escape(RECOMPUTED_EXPLANATION), ""]
    lines.append(r"\section*{Missing}")
    if report.missing:
        lines += [latex_escape(MISSING_NOTE), ""]
        for category, items in report.missing.items():
            lines += [r"\subsection*{" + latex_escape(category) + "}", r"\begin{itemize}"]
            lines += [r"\item " + latex_escape(item) for item in items]
            lines.append(r"\end{itemize}")
    else:
        lines.append("Nothing is missing.")
    lines += [r"\end{document}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Bar chart


def render_chart(report: Report, path: Path) -> None:
    """Plot the training-domain validation averages per dataset as grouped bars.

    Measured rows are solid bars with the standard error as error bars;
    published rows are hatched bars.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    section = next(
        (s for s in report.sections if s.selection_label == TRAINING_DOMAIN_VALIDATION),
        report.sections[0] if report.sections else None,
    )
    table = section.overall_table if section else Table("", [], [])
    if len(table.columns) == 2:
        # With one dataset the Avg column repeats it, so plot the dataset only.
        rows = [Row(row.label, row.cells[:1], row.published, row.footnote) for row in table.rows]
        table = Table(table.title, table.columns[:1], rows)
    rows = [row for row in table.rows if any(cell.mean is not None for cell in row.cells)]

    width = max(6.0, 1.2 + 0.3 * max(len(rows), 1) * max(len(table.columns), 1))
    figure, axes = plt.subplots(figsize=(min(width, 30.0), 5.0))
    if not rows:
        axes.text(0.5, 0.5, "No results to plot", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
    else:
        bar_width = 0.8 / len(rows)
        colors = plt.get_cmap("tab20").colors
        for index, row in enumerate(rows):
            positions, heights, errors = [], [], []
            for column_index, cell in enumerate(row.cells):
                if cell.mean is None:
                    continue
                positions.append(column_index - 0.4 + bar_width * (index + 0.5))
                heights.append(cell.mean)
                errors.append(cell.error or 0.0)
            axes.bar(
                positions,
                heights,
                width=bar_width,
                yerr=None if row.published else errors,
                capsize=2,
                color=colors[index % len(colors)],
                hatch="//" if row.published else None,
                edgecolor="black",
                linewidth=0.5,
                label=row.label,
            )
        axes.set_xticks(range(len(table.columns)))
        axes.set_xticklabels(table.columns)
        axes.set_ylabel("Test-domain accuracy (%)")
        axes.set_title(f"Average accuracy per dataset, model selection: {section.selection_label}")
        axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


# --------------------------------------------------------------------------
# Command line


def write_report(report: Report, output_dir: Path) -> List[Path]:
    """Write report.md, report.tex and report.png into output_dir and return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown_path, latex_path, chart_path = (output_dir / name for name in REPORT_FILES)
    markdown_path.write_text(render_markdown(report), encoding="utf-8")
    latex_path.write_text(render_latex(report), encoding="utf-8")
    render_chart(report, chart_path)
    return [markdown_path, latex_path, chart_path]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jps_domainbed.report",
        description=(
            "Summarize a DomainBed sweep as report.md, report.tex and report.png. "
            "Accuracies are test-domain accuracies in %, computed with DomainBed's "
            "collect_results code for training-domain validation and test-domain "
            "(oracle) model selection."
        ),
    )
    parser.add_argument(
        "--input_dir", type=Path, required=True,
        help="sweep output directory: one subdirectory per training job with its "
        "results.jsonl, and a done file once the job finished",
    )
    parser.add_argument(
        "--output_dir", type=Path, required=True,
        help="directory for report.md, report.tex and report.png; created if "
        "missing, existing report files are overwritten",
    )
    parser.add_argument(
        "--reference", action=argparse.BooleanOptionalAction, default=True,
        help="add published accuracies (%%) as rows marked '(published)' "
        "(default: --reference)",
    )
    parser.add_argument(
        "--reference_csv", type=Path, default=None,
        help="CSV of published accuracies in %% with the columns of the packaged "
        f"data/reference_results.csv (default: {DEFAULT_REFERENCE_CSV})",
    )
    parser.add_argument(
        "--datasets", nargs="+", default=None, metavar="DATASET",
        help="report only these DomainBed dataset names, e.g. PACS VLCS "
        "(default: every dataset in the sweep)",
    )
    parser.add_argument(
        "--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level for messages on stderr (default: INFO)",
    )
    return parser


def _log_missing(missing: Dict[str, List[str]]) -> None:
    if not missing:
        logger.info("no missing results")
        return
    total = sum(len(items) for items in missing.values())
    logger.warning("%d missing item(s); the report's Missing section lists them too", total)
    for category, items in missing.items():
        for item in items:
            logger.warning("%s: %s", category, item)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    if not args.input_dir.is_dir():
        logger.error(
            "--input_dir %s is not a directory. Pass the directory that the sweep got as --output_dir",
            args.input_dir,
        )
        return 2
    try:
        db = import_domainbed()
    except RuntimeError as error:
        logger.error("%s", error)
        return 2

    references: List[ReferenceResult] = []
    if args.reference:
        try:
            references = load_reference_results(args.reference_csv)
        except (OSError, ValueError) as error:
            logger.error("failed to read published results: %s. Fix the CSV or pass --no-reference", error)
            return 2
        logger.info("loaded %d published result row(s)", len(references))

    logger.info("reading sweep %s", args.input_dir)
    report = build_report(args.input_dir, references, args.datasets, db=db)
    if not report.record_count:
        logger.warning("no records found in %s", args.input_dir)
    _log_missing(report.missing)
    for path in write_report(report, args.output_dir):
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

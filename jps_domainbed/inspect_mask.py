"""Print and plot where a JPS mask sits in the CLIP image encoder.

Usage::

    python -m jps_domainbed.inspect_mask OUTPUT_DIR/model.pkl [--output PNG] [--top N]

``model.pkl`` is the file that ``python -m domainbed.scripts.train --algorithm
JPS`` writes into its ``--output_dir``. The command prints, per candidate
weight and transformer block, how many weights the mask selects and how they
spread over the weight's rows ("units"), then the units with the most selected
weights. It writes a bar chart of the counts against the block index (default:
``mask_per_block.png`` next to the model.pkl).

A unit is one row of a weight matrix, that is one output feature of the layer.
In ``mlp.c_fc.weight``, shape (4 * width, width), a row is one MLP hidden unit
and a column is one input feature. Other candidate patterns, such as
``*.mlp.c_proj.weight``, have other output features as rows.

Invalid input (a missing or foreign file, a checkpoint of another algorithm,
a checkpoint without a mask, an unusable output path) exits with status 2
and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pickle
import re
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .mask import SparseMask

logger = logging.getLogger(__name__)

# Must equal jps_domainbed.algorithms.CHECKPOINT_FORMAT. It is repeated here
# because importing algorithms.py needs DomainBed, and this tool does not.
CHECKPOINT_FORMAT = "jps-domainbed-checkpoint/1"
ALGORITHM = "JPS"
DEFAULT_OUTPUT_NAME = "mask_per_block.png"
DEFAULT_TOP = 10
EXIT_INVALID_INPUT = 2

BLOCK_PATTERN = re.compile(r"(?:^|\.)resblocks\.(\d+)\.(.+)$")
TRAIN_COMMAND = "python -m domainbed.scripts.train"


class InvalidInputError(Exception):
    """Input that this tool cannot use. The message names the value and the fix."""


# --------------------------------------------------------------------------
# Loading


def check_model_pkl_path(path: Path) -> None:
    """Raise InvalidInputError unless ``path`` is an existing file."""
    if not path.exists():
        raise InvalidInputError(
            f"model.pkl not found: {path}. Pass the model.pkl that `{TRAIN_COMMAND}` "
            "wrote into its --output_dir")
    if path.is_dir():
        raise InvalidInputError(
            f"{path} is a directory, not a model.pkl. Pass the file inside it, "
            f"for example {path / 'model.pkl'}")


def load_model_pkl(path: Path) -> object:
    """Load ``path`` with ``torch.load`` onto the CPU.

    The file is first read with ``weights_only=True``, which restores only
    tensors and plain containers. When that fails, a warning is logged and the
    file is read again as a full pickle. Unpickling can run arbitrary code, so
    pass only model.pkl files that you or your own jobs wrote.
    """
    check_model_pkl_path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message spans several lines with terminal escapes, so only the
        # first sentence of the line that names the rejected class is logged.
        detail = next((line.strip().split(". ")[0] for line in str(error).splitlines()
                       if "Unsupported global" in line), "objects other than tensors and containers")
        logger.warning(
            "%s could not be loaded with weights_only=True (%s). Loading it as a full "
            "pickle, which can run code stored in the file, so open only files you trust",
            path, detail)
    except Exception as error:  # torch.load raises many types for a non-torch file
        raise _unreadable(path, error) from error

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> InvalidInputError:
    return InvalidInputError(
        f"{path} could not be read by torch.load ({type(error).__name__}: "
        f"{_first_line(error)}). Pass a model.pkl written by `{TRAIN_COMMAND}`")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


def _training_args(saved: Mapping[str, object]) -> Dict[str, object]:
    """Return DomainBed's command-line arguments stored in model.pkl, or {}."""
    args = saved.get("args")
    if isinstance(args, Mapping):
        return dict(args)
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return {}


def _describe_content(saved: object, max_keys: int = 10) -> str:
    if not isinstance(saved, Mapping):
        return f"a {type(saved).__name__}"
    if not saved:
        return "an empty dict"
    keys = sorted(map(str, saved))
    text = f"keys {', '.join(keys[:max_keys])}"
    if len(keys) > max_keys:
        text += f" and {len(keys) - max_keys} more"
    return text


def jps_checkpoint(saved: object, path: Path) -> Dict[str, object]:
    """Return the JPS checkpoint inside a loaded DomainBed model.pkl.

    Raises InvalidInputError when ``saved`` is not a DomainBed model.pkl,
    belongs to another algorithm, or has an unsupported checkpoint format.
    """
    if not isinstance(saved, Mapping) or "model_dict" not in saved:
        raise InvalidInputError(
            f"{path} is not a DomainBed model.pkl because it has no 'model_dict' entry "
            f"(found {_describe_content(saved)}). Pass the model.pkl from the --output_dir of `{TRAIN_COMMAND}`")

    checkpoint = saved["model_dict"]
    is_plugin_checkpoint = isinstance(checkpoint, Mapping) and "format" in checkpoint
    if is_plugin_checkpoint and "algorithm" in checkpoint:
        algorithm = checkpoint["algorithm"]
    else:
        algorithm = _training_args(saved).get("algorithm", "unknown")
    if algorithm != ALGORITHM:
        raise InvalidInputError(
            f"{path} was written by algorithm {algorithm}, not {ALGORITHM}, so it has no "
            f"JPS mask. Pass the model.pkl of a run with --algorithm {ALGORITHM}")

    if not is_plugin_checkpoint:
        raise InvalidInputError(
            f"the model_dict in {path} is not a jps-domainbed checkpoint (no 'format' "
            f"entry). Retrain with this version of jps_domainbed, which writes "
            f"{CHECKPOINT_FORMAT!r}")
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise InvalidInputError(
            f"{path} has checkpoint format {checkpoint['format']!r}, but this version of "
            f"jps_domainbed reads {CHECKPOINT_FORMAT!r}. Use the jps_domainbed version "
            "that trained it")
    return dict(checkpoint)


def mask_from_checkpoint(saved: Mapping[str, object], checkpoint: Mapping[str, object],
                         path: Path) -> SparseMask:
    """Return the SparseMask of a JPS checkpoint.

    Raises InvalidInputError when the selection never ran (mask None) or the
    stored mask is invalid.
    """
    state = checkpoint.get("mask")
    if state is None:
        hparams = saved.get("model_hparams")
        needed = hparams.get("jps_selection_batches") if isinstance(hparams, Mapping) else None
        steps = _training_args(saved).get("steps")
        ran = f"after {steps} step(s)" if steps is not None else "early"
        minimum = f"--steps {needed} or more" if needed is not None else "more --steps"
        raise InvalidInputError(
            f"{path} contains a JPS checkpoint without a mask: training stopped {ran}, "
            f"before the first jps_selection_batches={needed} steps that select the mask "
            f"had run. Train with {minimum}")
    try:
        return SparseMask.from_state_dict(state)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InvalidInputError(
            f"the JPS mask in {path} is invalid ({type(error).__name__}: {error}). "
            "The file may be damaged; retrain to write a new one") from error


# --------------------------------------------------------------------------
# Per-weight summary


@dataclasses.dataclass
class WeightSummary:
    """Selected entries of one candidate weight, counted per unit (row)."""

    name: str
    block: Optional[int]
    kind: str  # the name after "resblocks.{i}.", or the full name outside blocks
    shape: Tuple[int, ...]
    unit_counts: torch.Tensor  # selected entries per unit, int64, length shape[0]

    @property
    def num_selected(self) -> int:
        return int(self.unit_counts.sum())

    @property
    def num_units(self) -> int:
        return int(self.unit_counts.numel())

    @property
    def units_with_selection(self) -> int:
        return int((self.unit_counts > 0).sum())

    @property
    def max_per_unit(self) -> int:
        return int(self.unit_counts.max()) if self.unit_counts.numel() else 0


def block_and_kind(name: str) -> Tuple[Optional[int], str]:
    """Split ``...resblocks.{i}.REST`` into (i, REST). Other names give (None, name)."""
    match = BLOCK_PATTERN.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), match.group(2)


def unit_counts(mask: SparseMask, name: str) -> torch.Tensor:
    """Count the selected entries of ``name`` per index along its first dimension.

    For a 2-D weight that index is the row (an output feature). A 1-D weight
    (such as a bias) has one entry per unit.
    """
    shape = mask.shapes[name]
    num_units = shape[0] if shape else 1
    if len(shape) == 2:
        units, _ = mask.rows_and_columns(name)
    else:
        entries_per_unit = 1
        for size in shape[1:]:
            entries_per_unit *= size
        units = mask.indices[name] // entries_per_unit
    return torch.bincount(units, minlength=num_units)


def summarize_mask(mask: SparseMask) -> List[WeightSummary]:
    """Return one WeightSummary per candidate weight, ordered by block index, then name.

    Weights outside transformer blocks come last.
    """
    summaries = []
    for name in mask.names:
        block, kind = block_and_kind(name)
        summaries.append(WeightSummary(name=name, block=block, kind=kind,
                                       shape=tuple(mask.shapes[name]),
                                       unit_counts=unit_counts(mask, name)))
    summaries.sort(key=lambda summary: (summary.block is None, summary.block or 0, summary.name))
    return summaries


@dataclasses.dataclass(frozen=True)
class UnitCount:
    block: Optional[int]
    kind: str
    unit: int
    count: int


def top_units(summaries: Sequence[WeightSummary], limit: int) -> List[UnitCount]:
    """Return the ``limit`` units with the most selected entries.

    Ties are ordered by block, weight and unit index, so the listing is stable.
    Units without a selected entry are never listed.
    """
    units = []
    for summary in summaries:
        for unit in torch.nonzero(summary.unit_counts).flatten().tolist():
            units.append(UnitCount(summary.block, summary.kind, unit,
                                   int(summary.unit_counts[unit])))
    units.sort(key=lambda item: (-item.count, item.block is None, item.block or 0, item.kind,
                                 item.unit))
    return units[:limit]


# --------------------------------------------------------------------------
# Text output


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                  left_aligned: Sequence[int] = ()) -> List[str]:
    """Format columns separated by two spaces. Columns not in ``left_aligned`` are right-aligned."""
    widths = [max([len(header)] + [len(row[column]) for row in rows])
              for column, header in enumerate(headers)]

    def line(cells):
        padded = [cell.ljust(width) if column in left_aligned else cell.rjust(width)
                  for column, (cell, width) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    return [line(headers)] + [line(row) for row in rows]


def _block_label(block: Optional[int]) -> str:
    return "-" if block is None else str(block)


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _unit_description(summaries: Sequence[WeightSummary]) -> str:
    text = "A unit is one row of the weight, that is one output feature of its layer."
    if any(summary.kind.endswith("mlp.c_fc.weight") for summary in summaries):
        text += " In mlp.c_fc.weight, a row is one MLP hidden unit."
    return text


def header_lines(path: Path, saved: Mapping[str, object], checkpoint: Mapping[str, object],
                 mask: SparseMask) -> List[str]:
    """Return the lines that describe the model, the training run and the mask totals."""
    clip = checkpoint.get("clip") if isinstance(checkpoint.get("clip"), Mapping) else {}
    metadata = mask.metadata
    lines = [f"JPS mask in {path}"]

    encoder = f"Encoder: {clip.get('model_name', 'unknown')} (pretrained: {clip.get('pretrained', 'unknown')})"
    if metadata.get("candidate_patterns"):
        encoder += f", candidate weights: {', '.join(map(str, metadata['candidate_patterns']))}"
    lines.append(encoder)

    args = _training_args(saved)
    if args:
        lines.append(f"Training: dataset {args.get('dataset', 'unknown')}, test envs "
                     f"{args.get('test_envs', 'unknown')}, {args.get('steps', 'unknown')} steps")

    k = metadata.get("k", "not recorded")
    rho = metadata.get("rho", "not recorded")
    lines.append(f"Selected: {mask.num_selected} of {mask.num_candidates} candidate weights "
                 f"({100.0 * mask.num_selected / max(mask.num_candidates, 1):.3f}%), "
                 f"k = {k}, rho = {rho}")
    if metadata.get("survivor_counts"):
        counts = ", ".join(str(count) for count in metadata["survivor_counts"])
        lines.append("Importance-operator survivors, intersected over the first 1, 2, ... "
                     f"source domains: {counts}")
    return lines


def block_table_lines(summaries: Sequence[WeightSummary]) -> List[str]:
    """Return the table of selected weights per candidate weight and block."""
    total_selected = sum(summary.num_selected for summary in summaries)
    rows = []
    for index, summary in enumerate(summaries):
        rows.append([
            _block_label(summary.block), summary.kind, "x".join(map(str, summary.shape)),
            str(summary.num_selected), _percent(summary.num_selected, total_selected),
            f"{summary.units_with_selection}/{summary.num_units}", str(summary.max_per_unit),
        ])
        # With several candidate weights in one block, add that block's total.
        last_of_block = (index + 1 == len(summaries) or summaries[index + 1].block != summary.block)
        in_block = [other for other in summaries if other.block == summary.block]
        if summary.block is not None and last_of_block and len(in_block) > 1:
            block_selected = sum(other.num_selected for other in in_block)
            rows.append([str(summary.block), "(block total)", "", str(block_selected),
                         _percent(block_selected, total_selected), "", ""])
    rows.append(["total", "", "", str(total_selected), _percent(total_selected, total_selected),
                 f"{sum(s.units_with_selection for s in summaries)}/{sum(s.num_units for s in summaries)}",
                 str(max((s.max_per_unit for s in summaries), default=0))])
    headers = ["block", "weight", "shape", "selected", "share", "units with selection",
               "max per unit"]
    return _format_table(headers, rows, left_aligned=(1, 2))


def top_units_lines(units: Sequence[UnitCount]) -> List[str]:
    rows = [[str(rank), _block_label(item.block), item.kind, str(item.unit), str(item.count)]
            for rank, item in enumerate(units, start=1)]
    return _format_table(["rank", "block", "weight", "unit", "selected"], rows, left_aligned=(2,))


def render_report(path: Path, saved: Mapping[str, object], checkpoint: Mapping[str, object],
                  mask: SparseMask, summaries: Sequence[WeightSummary], top: int) -> str:
    """Return the text that the command prints to stdout."""
    lines = header_lines(path, saved, checkpoint, mask)
    lines += ["", "Selected weights per transformer block", _unit_description(summaries)]
    lines += block_table_lines(summaries)
    if top > 0:
        units = top_units(summaries, top)
        lines += ["", f"Top {len(units)} units by selected weights (of {top} requested)"
                  if len(units) < top else f"Top {top} units by selected weights"]
        lines += top_units_lines(units)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Plot


def plot_counts(summaries: Sequence[WeightSummary], path: Path, title: str) -> None:
    """Write a PNG with selected weights and units with a selection per block.

    Bars are stacked by weight name when a block has several candidate
    weights. Weights outside transformer blocks are named in a footnote.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    in_blocks = [summary for summary in summaries if summary.block is not None]
    outside = [summary for summary in summaries if summary.block is None]
    blocks = sorted({summary.block for summary in in_blocks})
    kinds = sorted({summary.kind for summary in in_blocks})

    figure, (selected_axes, units_axes) = plt.subplots(
        2, 1, sharex=True, figsize=(max(6.0, min(0.45 * len(blocks) + 2.0, 20.0)), 6.0),
        gridspec_kw={"height_ratios": [3, 2]})
    figure.suptitle(title)
    if not blocks:
        selected_axes.text(0.5, 0.5, "No candidate weights inside transformer blocks",
                           ha="center", va="center", transform=selected_axes.transAxes)

    colors = plt.get_cmap("tab10").colors
    selected_bottom = {block: 0 for block in blocks}
    units_bottom = {block: 0 for block in blocks}
    for color_index, kind in enumerate(kinds):
        of_kind = {summary.block: summary for summary in in_blocks if summary.kind == kind}
        selected = [of_kind[block].num_selected if block in of_kind else 0 for block in blocks]
        units = [of_kind[block].units_with_selection if block in of_kind else 0 for block in blocks]
        color = colors[color_index % len(colors)]
        selected_axes.bar(blocks, selected, bottom=[selected_bottom[b] for b in blocks],
                          color=color, label=kind)
        units_axes.bar(blocks, units, bottom=[units_bottom[b] for b in blocks], color=color)
        for block, count, unit_count in zip(blocks, selected, units):
            selected_bottom[block] += count
            units_bottom[block] += unit_count

    # Totals above the bars. At x-small size, labels of 32 blocks (ViT-H) do not overlap.
    for axes, totals in ((selected_axes, selected_bottom), (units_axes, units_bottom)):
        for block in blocks:
            axes.annotate(str(totals[block]), (block, totals[block]), ha="center",
                          va="bottom", fontsize="x-small", xytext=(0, 1),
                          textcoords="offset points")
        axes.margins(y=0.15)
        axes.yaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        axes.grid(axis="y", alpha=0.3)

    selected_axes.set_ylabel("Selected weights")
    units_axes.set_ylabel("Units with ≥ 1\nselected weight")
    units_axes.set_xlabel("Transformer block index")
    units_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if blocks:
        units_axes.set_xlim(blocks[0] - 0.6, blocks[-1] + 0.6)
    if len(kinds) > 1:
        selected_axes.legend(fontsize="small")
    elif kinds:
        selected_axes.set_title(f"weight: {kinds[0]}", fontsize="small")
        unit_sizes = sorted({summary.num_units for summary in in_blocks})
        units_axes.set_title(f"out of {', '.join(map(str, unit_sizes))} units (rows) per block",
                             fontsize="small")

    if outside:
        figure.text(0.01, 0.005,
                    f"Not plotted: {sum(s.num_selected for s in outside)} selected entries of "
                    f"weights outside transformer blocks ({', '.join(s.name for s in outside)})",
                    fontsize="x-small")
    figure.tight_layout(rect=(0, 0.03 if outside else 0, 1, 1))
    figure.savefig(path, format="png", dpi=120)
    plt.close(figure)


def plot_title(checkpoint: Mapping[str, object], mask: SparseMask) -> str:
    clip = checkpoint.get("clip") if isinstance(checkpoint.get("clip"), Mapping) else {}
    k = mask.metadata.get("k", mask.num_selected)
    return (f"JPS mask, k = {k}: selected weights per block\n"
            f"{clip.get('model_name', 'unknown model')} (pretrained: {clip.get('pretrained', 'unknown')})")


# --------------------------------------------------------------------------
# Command line


def output_path(model_pkl: Path, requested: Optional[Path]) -> Path:
    """Return the path of the PNG, or raise InvalidInputError when it is unusable."""
    path = requested if requested is not None else model_pkl.parent / DEFAULT_OUTPUT_NAME
    if path.suffix.lower() != ".png":
        raise InvalidInputError(
            f"--output {path} does not end in .png, and this tool writes PNG only. "
            f"Pass a path such as {path.with_suffix('.png')}")
    if not path.parent.is_dir():
        raise InvalidInputError(
            f"the folder {path.parent} of --output {path} does not exist. Create it first "
            "or pass --output inside an existing folder")
    if path.is_dir():
        raise InvalidInputError(f"--output {path} is a directory. Pass a file path ending in .png")
    return path


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jps_domainbed.inspect_mask",
        description=(
            "Print the number of weights that a JPS mask selects per transformer block "
            "and per unit (a row of the weight, which is an MLP hidden unit in mlp.c_fc.weight), "
            "and plot the counts per block as a PNG."),
    )
    parser.add_argument(
        "model_pkl", type=Path, metavar="MODEL_PKL",
        help=f"model.pkl that `{TRAIN_COMMAND} --algorithm JPS` wrote into its --output_dir. "
        "It may be unpickled in full, which can run code, so pass only files you trust")
    parser.add_argument(
        "--output", type=Path, default=None, metavar="PNG",
        help=f"path of the PNG plot. Its folder must exist, and an existing file is "
        f"overwritten (default: {DEFAULT_OUTPUT_NAME} next to MODEL_PKL)")
    parser.add_argument(
        "--top", type=_non_negative_int, default=DEFAULT_TOP, metavar="N",
        help=f"number of units with the most selected weights to list. 0 leaves the list out "
        f"(default: {DEFAULT_TOP})")
    parser.add_argument(
        "--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level for messages on stderr (default: INFO)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)

    try:
        check_model_pkl_path(args.model_pkl)
        png_path = output_path(args.model_pkl, args.output)
        saved = load_model_pkl(args.model_pkl)
        checkpoint = jps_checkpoint(saved, args.model_pkl)
        mask = mask_from_checkpoint(saved, checkpoint, args.model_pkl)
    except InvalidInputError as error:
        logger.error("%s", error)
        return EXIT_INVALID_INPUT

    k = mask.metadata.get("k")
    if k is not None and mask.num_selected != k:
        logger.warning("the mask selects %d weights but k = %s, because fewer than k candidates "
                       "survived the importance operator of every source domain",
                       mask.num_selected, k)

    summaries = summarize_mask(mask)
    sys.stdout.write(render_report(args.model_pkl, saved, checkpoint, mask, summaries, args.top))
    sys.stdout.flush()

    try:
        plot_counts(summaries, png_path, plot_title(checkpoint, mask))
    except OSError as error:
        logger.error("failed to write %s (%s). Check that the folder is writable", png_path, error)
        return EXIT_INVALID_INPUT
    logger.info("wrote %s", png_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

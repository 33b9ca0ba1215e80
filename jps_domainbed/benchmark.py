"""Step time, memory and checkpoint size of JPS against full fine-tuning.

``python -m jps_domainbed.benchmark`` trains one CLIP image encoder with a
linear head on random data, with the same encoder, image size and batch for
every method:

- ``jps_sparse``: JPS with the sparse masked update (``implementation="sparse"``).
- ``jps_dense``: JPS with the dense masked update (``implementation="dense"``).
- ``erm_full``: full fine-tuning, AdamW over every encoder and head weight.
- ``floor``: the same forward, and a backward from the loss to the output of
  the lowest masked ``c_fc`` layer, with every parameter (head included)
  frozen and no optimizer step. That backward computes every activation
  gradient the JPS step needs and no weight gradient, so no masked-update
  implementation can take less time per step.
- ``lora``: LoRA (peft, rank 8) on the same ``c_fc`` layers, plus the head.

The JPS mask is selected once, in the parent process, and that selection is
timed. Each method then runs in its own child process, so each peak memory
figure belongs to one method.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clip_featurizer import (CLIPSpec, PretrainedWeightsNotFoundError, build_clip_featurizer,
                              check_image_size, load_clip_model, resolve_weights)
from .mask import SparseMask
from .masked_training import apply_mask, masked_weights_state
from .selection import SelectionConfig, select_mask

# Named explicitly because under `python -m` this module's __name__ is "__main__".
logger = logging.getLogger("jps_domainbed.benchmark")

METHODS = ("jps_sparse", "jps_dense", "erm_full", "floor", "lora")
JPS_METHODS = {"jps_sparse": "sparse", "jps_dense": "dense"}
# Methods that need the JPS mask: floor stops its backward at the lowest masked layer.
MASK_METHODS = ("jps_sparse", "jps_dense", "floor")

# DomainBed trains PACS, VLCS, OfficeHome and TerraIncognita on three source domains.
SOURCE_DOMAINS = 3
LORA_RANK = 8
LORA_ALPHA = 16
# peft matches each target_modules entry against the end of a module name, so
# "c_fc" selects visual.transformer.resblocks.<i>.mlp.c_fc (checked with peft 0.21.2).
LORA_TARGET_MODULES = ["c_fc"]
BLOCK_INDEX = re.compile(r"\bresblocks\.(\d+)\.")

WEIGHTS_NOTE = (
    "pretrained='none' builds random weights. Step times and memory do not depend "
    "on weight values, except through the mask: the lowest block that holds a "
    "selected weight sets how far the JPS and floor backward passes go, and "
    "pretrained weights can put that block elsewhere.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jps_domainbed.benchmark",
        description="Measure step time, peak memory, optimizer state, trainable parameters "
                    "and checkpoint size of JPS (sparse and dense updates), full fine-tuning, "
                    "LoRA and a no-weight-gradient floor, on one CLIP image encoder.")
    parser.add_argument("--model", default="ViT-B-16",
                        help="open_clip architecture name (default: ViT-B-16)")
    parser.add_argument("--pretrained", default="none",
                        help="open_clip pretrained tag, weights file, or 'none' for random "
                             "weights (default: none)")
    parser.add_argument("--image_size", type=int, default=96,
                        help="encoder input size in pixels; the patch size must divide it "
                             "(default: 96)")
    parser.add_argument("--num_classes", type=int, default=7,
                        help="classes of the linear head (default: 7, as in PACS)")

    parser.add_argument("--batch_size", type=int, default=8,
                        help="images per training step, and per selection minibatch "
                             "(default: 8)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed training steps per method; the median is reported "
                             "(default: 5)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed training steps before the timed ones (default: 1)")
    parser.add_argument("--lr", type=float, default=5e-5,
                        help="AdamW learning rate (default: 5e-5)")
    parser.add_argument("--weight_decay", type=float, default=1e-4,
                        help="AdamW weight decay (default: 1e-4)")

    parser.add_argument("--k", type=int, default=2000,
                        help="number of encoder weights JPS selects (default: 2000)")
    parser.add_argument("--rho", type=float, default=0.05,
                        help="fraction of candidate weights the JPS importance operator "
                             "keeps per source domain, in (0, 1] (default: 0.05)")
    parser.add_argument("--selection_batches", type=int, default=8,
                        help=f"minibatches per source domain for the JPS selection, with "
                             f"{SOURCE_DOMAINS} source domains (default: 8, DomainBed's "
                             "jps_selection_batches)")
    parser.add_argument("--reference_steps", type=int, default=5000,
                        help="length in steps of the training run that the selection time "
                             "is compared with (default: 5000; DomainBed trains 5001 steps "
                             "by default)")

    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to train on (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights and data (default: 0)")

    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        metavar="METHOD",
                        help=f"methods to measure, any of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="FILE",
                        help="write the raw measurements to FILE as JSON")
    parser.add_argument("--log_level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="level of the progress messages on stderr (default: INFO)")

    # Internal: a child process measuring one method.
    parser.add_argument("--_worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_workdir", default=None, help=argparse.SUPPRESS)
    return parser


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` naming the first invalid option."""
    for name, minimum in (("batch_size", 1), ("steps", 1), ("warmup", 0),
                          ("selection_batches", 1), ("reference_steps", 1),
                          ("num_classes", 2)):
        value = getattr(args, name)
        if value < minimum:
            parser.error(f"--{name} must be at least {minimum}, got {value}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    try:
        check_image_size(args.model, args.image_size)
        resolve_weights(CLIPSpec(args.model, pretrained=args.pretrained,
                                 image_size=args.image_size))
        SelectionConfig(k=args.k, rho=args.rho,
                        selection_batches=args.selection_batches).validate()
    except (ValueError, PretrainedWeightsNotFoundError) as error:
        parser.error(str(error))

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested, but torch.cuda.is_available() is False "
                     f"(torch {torch.__version__}); run on a machine with a CUDA GPU or "
                     "use --device cpu")
    args.methods = list(dict.fromkeys(args.methods))


# Memory ---------------------------------------------------------------------

def _proc_status_bytes(field_name: str) -> Optional[int]:
    """Return a kB field of /proc/self/status in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss_bytes() -> Optional[int]:
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Return the peak resident set size of this process, in bytes.

    VmHWM is read in preference to ``getrusage``, because Linux carries
    ``ru_maxrss`` over ``execve``, so a child would report its parent's peak
    when the parent was larger.
    """
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes and macOS bytes.
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); return whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# Machine description --------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().total)


def load_average() -> Optional[List[float]]:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def package_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe_config(args: argparse.Namespace) -> Dict[str, object]:
    gpu_name = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    return {
        "model": args.model,
        "pretrained": args.pretrained,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "k": args.k,
        "rho": args.rho,
        "selection_batches": args.selection_batches,
        "source_domains": SOURCE_DOMAINS,
        "reference_steps": args.reference_steps,
        "num_classes": args.num_classes,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "methods": list(args.methods),
        "device": args.device,
        "threads": args.threads,
        "torch_version": torch.__version__,
        "open_clip_version": package_version("open_clip_torch"),
        "peft_version": package_version("peft"),
        "python_version": platform.python_version(),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_cores": os.cpu_count(),
            "memory_bytes": total_memory_bytes(),
            "gpu_name": gpu_name,
            "platform": platform.platform(),
        },
        "load_average_start": load_average(),
        "note": WEIGHTS_NOTE,
    }


# Model and data --------------------------------------------------------------

def build_encoder_and_head(args: argparse.Namespace):
    """Return (featurizer, head) on ``args.device``, with weights drawn from ``args.seed``.

    The text tower is dropped once built, as the DomainBed algorithms do.
    """
    torch.manual_seed(args.seed)
    spec = CLIPSpec(args.model, pretrained=args.pretrained, image_size=args.image_size)
    featurizer, clip_model = build_clip_featurizer((3, args.image_size, args.image_size), spec)
    del clip_model
    gc.collect()
    head = nn.Linear(featurizer.n_outputs, args.num_classes)
    return featurizer.to(args.device), head.to(args.device)


def random_batches(args: argparse.Namespace, count: int, shift: float = 0.0, seed_offset: int = 0):
    """Return ``count`` random (images, labels) minibatches on ``args.device``."""
    generator = torch.Generator().manual_seed(args.seed + 1 + seed_offset)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    return [(torch.randn(shape, generator=generator).add_(shift).to(args.device),
             torch.randint(0, args.num_classes, (args.batch_size,), generator=generator)
             .to(args.device))
            for _ in range(count)]


def lowest_masked_block(mask: SparseMask) -> int:
    """Return the index of the lowest transformer block holding a selected weight."""
    indices = []
    for name in mask.selected_names():
        match = BLOCK_INDEX.search(name)
        if match is None:
            raise ValueError(f"masked parameter {name!r} is not inside a transformer block")
        indices.append(int(match.group(1)))
    if not indices:
        raise ValueError("the mask selects no weight")
    return min(indices)


# Selection (parent process) ---------------------------------------------------

def run_selection(args: argparse.Namespace, workdir: Path) -> Dict[str, object]:
    """Time ``select_mask`` on random source domains and save the mask in ``workdir``."""
    featurizer, head = build_encoder_and_head(args)
    domains = [random_batches(args, args.selection_batches, shift=0.3 * domain,
                              seed_offset=1000 * (domain + 1))
               for domain in range(SOURCE_DOMAINS)]
    config = SelectionConfig(k=args.k, rho=args.rho, selection_batches=args.selection_batches)
    logger.info("selecting the JPS mask: k=%d, rho=%g, %d minibatches of %d images in each "
                "of %d source domains", args.k, args.rho, args.selection_batches,
                args.batch_size, SOURCE_DOMAINS)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(args.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    mask = select_mask(featurizer, head, domains, config, show_progress=False)
    synchronize(args.device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    torch.save(mask.state_dict(), workdir / "mask.pt")
    result = {
        "selection_s": seconds,
        "selection_cpu_s": cpu_seconds,
        "mask_size": mask.num_selected,
        "candidate_weights": mask.num_candidates,
        "lowest_masked_block": lowest_masked_block(mask),
        "masked_tensors": len(mask.selected_names()),
        "survivor_counts": mask.metadata.get("survivor_counts"),
        "cuda_peak_memory_bytes": (torch.cuda.max_memory_allocated()
                                   if args.device == "cuda" else None),
    }
    logger.info("selection took %.2f s: %d weights in %d tensors, lowest block %d",
                seconds, result["mask_size"], result["masked_tensors"],
                result["lowest_masked_block"])
    del featurizer, head, domains
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def load_mask(workdir: Path) -> SparseMask:
    return SparseMask.from_state_dict(torch.load(workdir / "mask.pt", weights_only=True))


# Methods (child processes) ---------------------------------------------------

@dataclass
class MethodSetup:
    """Training step, optimizer and checkpoint measurement of one method.

    ``step(x, y)`` runs one training step and returns the loss. ``checkpoint``
    measures the saved checkpoint and returns the row fields
    ``checkpoint_bytes`` and ``checkpoint_source``. It is None when the method
    saves nothing.
    """

    step: Callable[[torch.Tensor, torch.Tensor], float]
    optimizer: Optional[torch.optim.Optimizer]
    checkpoint: Optional[Callable[[], Dict[str, object]]] = None
    notes: List[str] = field(default_factory=list)


def adamw(params, args: argparse.Namespace) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def optimizer_step_fn(model: Callable[[torch.Tensor], torch.Tensor],
                      optimizer: torch.optim.Optimizer):
    """Return a step like ``CLIPAlgorithm.step``: cross-entropy, backward, optimizer step."""
    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def setup_jps(featurizer, head, args, workdir: Path, implementation: str) -> MethodSetup:
    mask = load_mask(workdir)
    optimizer = adamw([*featurizer.parameters(), *head.parameters()], args)
    masked = apply_mask(featurizer, mask, optimizer, implementation=implementation)
    notes = [f"mask of {mask.num_selected} weights in {len(mask.selected_names())} tensors, "
             f"lowest block {lowest_masked_block(mask)}"]
    if implementation == "dense":
        notes.append("the optimizer holds the whole masked c_fc tensors; only the "
                     "selected entries change")

    def checkpoint() -> Dict[str, object]:
        return jps_checkpoint(args, workdir, mask, implementation, masked, head)

    return MethodSetup(optimizer_step_fn(lambda x: head(featurizer(x)), optimizer),
                       optimizer, checkpoint, notes)


def setup_erm(featurizer, head, args, workdir: Path) -> MethodSetup:
    optimizer = adamw([*featurizer.parameters(), *head.parameters()], args)

    def checkpoint() -> Dict[str, object]:
        return erm_checkpoint(args, workdir, featurizer, head)

    return MethodSetup(optimizer_step_fn(lambda x: head(featurizer(x)), optimizer),
                       optimizer, checkpoint)


def setup_floor(featurizer, head, args, workdir: Path) -> MethodSetup:
    mask = load_mask(workdir)
    lowest = lowest_masked_block(mask)
    featurizer.requires_grad_(False)
    head.requires_grad_(False)
    modules = dict(featurizer.named_modules())
    # The output of the lowest masked layer is the last activation whose
    # gradient the JPS step needs: the masked weights' gradient is built from it.
    layer_name = next(name.rpartition(".")[0] for name in mask.selected_names()
                      if int(BLOCK_INDEX.search(name).group(1)) == lowest)
    layer = modules[layer_name]

    def make_leaf(module, inputs, output):
        return output.detach().requires_grad_(True)

    layer.register_forward_hook(make_leaf)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = F.cross_entropy(head(featurizer(x)), y)
        loss.backward()
        return loss.item()

    notes = [f"backward from the loss to the output of {layer_name} (block {lowest}); "
             "no parameter requires a gradient and no optimizer runs"]
    return MethodSetup(step, None, None, notes)


def setup_lora(featurizer, head, args, workdir: Path) -> MethodSetup:
    """Wrap the featurizer with peft LoRA; raise LoraUnavailable when that fails."""
    try:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    except ImportError as error:
        raise LoraUnavailable(f"peft is not importable ({error}); install peft") from error
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                        target_modules=list(LORA_TARGET_MODULES))
    try:
        model = get_peft_model(featurizer, config)
    except Exception as error:  # peft raises several types for models it cannot wrap
        raise LoraUnavailable(f"peft could not wrap the open_clip featurizer: "
                              f"{type(error).__name__}: {error}") from error
    wrapped = [name for name, module in model.named_modules() if name.endswith(".c_fc")
               and hasattr(module, "lora_A")]
    if not wrapped:
        raise LoraUnavailable(f"peft matched no c_fc layer with target_modules="
                              f"{LORA_TARGET_MODULES}")
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = adamw([*trainable, *head.parameters()], args)

    def checkpoint() -> Dict[str, object]:
        state = {"model_dict": {"lora": get_peft_model_state_dict(model),
                                "head": head.state_dict()}}
        return {"checkpoint_bytes": saved_size(state),
                "checkpoint_source": "LoRA adapter weights and head (no DomainBed algorithm "
                                     "for LoRA exists in this package)"}

    notes = [f"LoRA rank {LORA_RANK}, alpha {LORA_ALPHA}, on {len(wrapped)} c_fc layers"]
    return MethodSetup(optimizer_step_fn(lambda x: head(model(x)), optimizer),
                       optimizer, checkpoint, notes)


class LoraUnavailable(RuntimeError):
    """peft is missing or cannot wrap the model, so the lora row is skipped."""


# Checkpoint size ----------------------------------------------------------------

def saved_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getbuffer())


def domainbed_unavailable_reason() -> Optional[str]:
    """Return why the DomainBed algorithms cannot be built, or None when they can."""
    try:
        from domainbed import algorithms
    except ImportError as error:
        return f"DomainBed is not importable ({error})"
    if "JPS" not in algorithms.ALGORITHMS:
        return "DomainBed is not patched for plugins (JPS is not in ALGORITHMS)"
    return None


def pretrained_source(args: argparse.Namespace, workdir: Path) -> str:
    """Return a ``clip_pretrained`` value that gives the algorithms a pretrained source.

    With random weights the encoder has nothing to be rebuilt from, so JPS
    would save it whole. Saving the random weights to a file and building
    from that file gives the checkpoint users get with real pretrained weights.
    """
    if not CLIPSpec(args.model, pretrained=args.pretrained).is_random_init:
        return args.pretrained
    path = workdir / "clip_weights.pt"
    if not path.exists():
        torch.manual_seed(args.seed)
        model = load_clip_model(CLIPSpec(args.model, pretrained="none",
                                         image_size=args.image_size))
        partial = path.with_suffix(".partial")
        torch.save(model.state_dict(), partial)
        partial.rename(path)
        del model
    return str(path)


def domainbed_payload(algorithm_name: str, algorithm, hparams, args) -> Dict[str, object]:
    """Return what DomainBed's train.py writes to model.pkl.

    A short ``args`` dict replaces train.py's command-line arguments.
    """
    return {
        "args": {"algorithm": algorithm_name, "dataset": "PACS", "seed": args.seed},
        "model_input_shape": (3, args.image_size, args.image_size),
        "model_num_classes": args.num_classes,
        "model_num_domains": SOURCE_DOMAINS,
        "model_hparams": hparams,
        "model_dict": algorithm.state_dict(),
    }


def domainbed_hparams(algorithm_name: str, args, workdir: Path) -> Dict[str, object]:
    from domainbed import hparams_registry

    hparams = hparams_registry.default_hparams(algorithm_name, "PACS")
    hparams.update(clip_model=args.model, clip_pretrained=pretrained_source(args, workdir),
                   clip_image_size=args.image_size, head_init="random",
                   lr=args.lr, weight_decay=args.weight_decay)
    return hparams


def jps_checkpoint(args, workdir: Path, mask: SparseMask, implementation: str,
                   masked, head: nn.Module) -> Dict[str, object]:
    reason = domainbed_unavailable_reason()
    if reason is not None:
        state = {"model_dict": {"masked_weights": masked_weights_state(masked),
                                "head": head.state_dict()}}
        return {"checkpoint_bytes": saved_size(state),
                "checkpoint_source": f"mask, selected values, weights hash and head; {reason}"}

    from .algorithms import JPS

    hparams = domainbed_hparams("JPS", args, workdir)
    hparams.update(jps_k=args.k, jps_rho=args.rho, jps_update=implementation,
                   jps_selection_batches=args.selection_batches)
    algorithm = JPS((3, args.image_size, args.image_size), args.num_classes,
                    SOURCE_DOMAINS, hparams)
    # The mask is already selected, so it is applied directly instead of
    # selecting it again from minibatches.
    algorithm._restrict_to_mask(mask)
    payload = domainbed_payload("JPS", algorithm, hparams, args)
    return {"checkpoint_bytes": saved_size(payload),
            "checkpoint_source": "DomainBed model.pkl of the JPS algorithm, encoder "
                                 "built from a local weights file"}


def erm_checkpoint(args, workdir: Path, featurizer: nn.Module, head: nn.Module) -> Dict[str, object]:
    reason = domainbed_unavailable_reason()
    if reason is not None:
        state = {"model_dict": {"encoder": featurizer.state_dict(), "head": head.state_dict()}}
        return {"checkpoint_bytes": saved_size(state),
                "checkpoint_source": f"encoder and head state dicts; {reason}"}

    from .algorithms import CLIP_ERM

    hparams = domainbed_hparams("CLIP_ERM", args, workdir)
    algorithm = CLIP_ERM((3, args.image_size, args.image_size), args.num_classes,
                         SOURCE_DOMAINS, hparams)
    payload = domainbed_payload("CLIP_ERM", algorithm, hparams, args)
    return {"checkpoint_bytes": saved_size(payload),
            "checkpoint_source": "DomainBed model.pkl of the CLIP_ERM algorithm"}


# Measurement of one method --------------------------------------------------------

def empty_row(method: str) -> Dict[str, object]:
    return {
        "method": method,
        "step_time_s": None,
        "step_times_s": None,
        "step_cpu_time_s": None,
        "step_cpu_times_s": None,
        "peak_memory_bytes": None,
        "peak_memory_kind": None,
        "training_peak_rss_bytes": None,
        "rss_before_model_bytes": None,
        "optimizer_state_bytes": None,
        "trainable_params": None,
        "checkpoint_bytes": None,
        "checkpoint_source": None,
        "selection_s": None,
        "selection_percent_of_reference_run": None,
        "selection_cpu_s": None,
        "selection_cpu_percent_of_reference_run": None,
        "torch_threads": None,
        "load_average": None,
        "skipped": False,
        "error": False,
        "reason": None,
        "notes": [],
    }


def optimizer_state_bytes(optimizer: Optional[torch.optim.Optimizer]) -> int:
    if optimizer is None:
        return 0
    return sum(value.nbytes for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value))


def trainable_count(optimizer: Optional[torch.optim.Optimizer]) -> int:
    """Number of elements in the tensors the optimizer updates."""
    if optimizer is None:
        return 0
    return sum(param.numel() for group in optimizer.param_groups for param in group["params"])


def measure_method(method: str, args: argparse.Namespace, workdir: Path) -> Dict[str, object]:
    """Build, warm up and time one method in this process; return its row."""
    row = empty_row(method)
    row["torch_threads"] = torch.get_num_threads()
    row["rss_before_model_bytes"] = current_rss_bytes()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    featurizer, head = build_encoder_and_head(args)
    featurizer.train()
    try:
        if method in JPS_METHODS:
            setup = setup_jps(featurizer, head, args, workdir, JPS_METHODS[method])
        elif method == "erm_full":
            setup = setup_erm(featurizer, head, args, workdir)
        elif method == "floor":
            setup = setup_floor(featurizer, head, args, workdir)
        else:
            setup = setup_lora(featurizer, head, args, workdir)
    except LoraUnavailable as error:
        logger.warning("skipping lora: %s", error)
        row.update(skipped=True, reason=str(error))
        return row
    row["notes"] = setup.notes

    batches = random_batches(args, min(args.warmup + args.steps, 4))
    training_peak_reset = reset_peak_rss()
    load_start = load_average()
    logger.info("%s: %d warm-up and %d timed steps of %d images at %d px on %s",
                method, args.warmup, args.steps, args.batch_size, args.image_size, args.device)
    for index in range(args.warmup):
        setup.step(*batches[index % len(batches)])
    # Process CPU time (all threads) is recorded next to wall time because
    # it changes less when other processes share the CPU cores.
    times, cpu_times = [], []
    for index in range(args.steps):
        x, y = batches[(args.warmup + index) % len(batches)]
        synchronize(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        setup.step(x, y)
        synchronize(args.device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)

    # Memory is read before the checkpoint is measured, because that builds
    # a second model.
    rss_peak = peak_rss_bytes()
    # NOTE: the CUDA branches of this module have not been run on a GPU yet.
    if args.device == "cuda":
        row.update(peak_memory_bytes=torch.cuda.max_memory_allocated(),
                   peak_memory_kind="torch.cuda.max_memory_allocated")
    else:
        row.update(peak_memory_bytes=rss_peak, peak_memory_kind="process peak RSS")
    row["training_peak_rss_bytes"] = rss_peak if training_peak_reset else None
    row.update(step_time_s=statistics.median(times), step_times_s=times,
               step_cpu_time_s=statistics.median(cpu_times), step_cpu_times_s=cpu_times,
               optimizer_state_bytes=optimizer_state_bytes(setup.optimizer),
               trainable_params=trainable_count(setup.optimizer),
               load_average=[load_start, load_average()])
    logger.info("%s: median step %.3f s, peak memory %.1f MiB", method, row["step_time_s"],
                row["peak_memory_bytes"] / 2**20)

    if setup.checkpoint is not None:
        logger.info("%s: measuring the checkpoint size", method)
        row.update(setup.checkpoint())
    return row


def worker_main(args: argparse.Namespace) -> int:
    workdir = Path(args._workdir)
    row = measure_method(args._worker, args, workdir)
    (workdir / f"{args._worker}.json").write_text(json.dumps(row))
    return 0


# Parent process ------------------------------------------------------------

def worker_argv(args: argparse.Namespace, method: str, workdir: Path) -> List[str]:
    argv = [sys.executable, "-m", "jps_domainbed.benchmark", "--_worker", method,
            "--_workdir", str(workdir)]
    for name in ("model", "pretrained", "image_size", "batch_size", "steps", "warmup", "k",
                 "rho", "selection_batches", "reference_steps", "num_classes", "lr",
                 "weight_decay", "device", "seed", "log_level"):
        argv += [f"--{name}", str(getattr(args, name))]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return argv


def run_worker(args: argparse.Namespace, method: str, workdir: Path) -> Dict[str, object]:
    """Measure ``method`` in a child process; return its row (with an error on failure)."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root,
                                                        os.environ.get("PYTHONPATH")])))
    logger.info("starting the %s measurement in a new process", method)
    completed = subprocess.run(worker_argv(args, method, workdir), env=env)
    result = workdir / f"{method}.json"
    if completed.returncode != 0 or not result.exists():
        row = empty_row(method)
        row["reason"] = (f"the {method} process exited with status {completed.returncode}; "
                         "its error is in the log above")
        row["error"] = True
        logger.error("%s", row["reason"])
        return row
    return json.loads(result.read_text())


def add_selection(rows: Sequence[Dict[str, object]], selection: Optional[Dict[str, object]],
                  reference_steps: int) -> None:
    if selection is None:
        return
    for row in rows:
        if row["method"] in JPS_METHODS and row.get("step_time_s"):
            row["selection_s"] = selection["selection_s"]
            row["selection_percent_of_reference_run"] = (
                100.0 * selection["selection_s"] / (reference_steps * row["step_time_s"]))
            row["selection_cpu_s"] = selection["selection_cpu_s"]
            row["selection_cpu_percent_of_reference_run"] = (
                100.0 * selection["selection_cpu_s"]
                / (reference_steps * row["step_cpu_time_s"]))


def run_benchmark(args: argparse.Namespace) -> Dict[str, object]:
    config = describe_config(args)
    logger.info("%s", WEIGHTS_NOTE)
    selection = None
    rows = []
    with tempfile.TemporaryDirectory(prefix="jps-benchmark-") as workdir_name:
        workdir = Path(workdir_name)
        if any(method in MASK_METHODS for method in args.methods):
            selection = run_selection(args, workdir)
            if args.device == "cpu":
                # From the command line, the parent has only imported torch
                # and built one model by now, like every child.
                selection["peak_rss_bytes"] = peak_rss_bytes()
        for method in args.methods:
            rows.append(run_worker(args, method, workdir))
    add_selection(rows, selection, args.reference_steps)
    config["load_average_end"] = load_average()
    return {"config": config, "selection": selection, "results": rows}


# Report -----------------------------------------------------------------------

def _ratio(value, reference) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}"


def _fraction(value, reference) -> str:
    """Format value/reference as 1/N for values far below the reference."""
    if value is None or not reference:
        return "-"
    if value >= reference:
        return f"{value / reference:.2f}"
    return f"1/{reference / value:,.0f}"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


def _markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def format_table(report: Dict[str, object]) -> str:
    """Return two Markdown tables, time and size, with ratios to erm_full and floor."""
    rows = report["results"]
    by_method = {row["method"]: row for row in rows}
    erm = by_method.get("erm_full", {})
    floor = by_method.get("floor", {})
    measured = [row for row in rows if not (row.get("skipped") or row.get("error"))]

    time_body = []
    for row in measured:
        step, cpu = row["step_time_s"], row["step_cpu_time_s"]
        percent = row.get("selection_percent_of_reference_run")
        time_body.append([
            row["method"],
            f"{step:.3f}",
            _ratio(step, erm.get("step_time_s")),
            _ratio(step, floor.get("step_time_s")),
            f"{cpu:.3f}",
            _ratio(cpu, erm.get("step_cpu_time_s")),
            _ratio(cpu, floor.get("step_cpu_time_s")),
            "-" if row["selection_s"] is None else f"{row['selection_s']:.2f}",
            "-" if percent is None else f"{percent:.3f} %",
        ])
    time_header = ["method", "step (s)", "step / ERM", "step / floor", "CPU time (s)",
                   "CPU / ERM", "CPU / floor", "selection (s)",
                   f"selection / {report['config']['reference_steps']} steps"]

    size_body = []
    for row in measured:
        size_body.append([
            row["method"],
            _mib(row["peak_memory_bytes"]),
            _ratio(row["peak_memory_bytes"], erm.get("peak_memory_bytes")),
            _mib(row["optimizer_state_bytes"]),
            f"{row['trainable_params']:,}",
            "-" if row["checkpoint_bytes"] is None else f"{row['checkpoint_bytes']:,}",
            _fraction(row["checkpoint_bytes"], erm.get("checkpoint_bytes")),
        ])
    size_header = ["method", "peak memory (MiB)", "memory / ERM", "optimizer state (MiB)",
                   "trainable params", "checkpoint (bytes)", "checkpoint / ERM"]

    lines = _markdown_table(time_header, time_body) + [""] + \
        _markdown_table(size_header, size_body)
    for row in rows:
        if row.get("skipped") or row.get("error"):
            lines.append(f"\n{row['method']} was not measured: {row['reason']}")
    return "\n".join(lines)


def format_report(report: Dict[str, object]) -> str:
    config = report["config"]
    machine = config["machine"]
    memory_kind = next((row["peak_memory_kind"] for row in report["results"]
                        if row.get("peak_memory_kind")), "peak memory")
    lines = [
        f"model {config['model']} (pretrained={config['pretrained']}), "
        f"{config['image_size']} px, batch {config['batch_size']}, "
        f"{config['warmup']} warm-up + {config['steps']} timed steps (median), "
        f"device {config['device']}, torch {config['torch_version']}",
        f"machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, "
        f"{_mib(machine['memory_bytes'])} MiB RAM"
        + (f", GPU {machine['gpu_name']}" if machine["gpu_name"] else ""),
        f"load average (1, 5, 15 min): start {config['load_average_start']}, "
        f"end {config.get('load_average_end')}",
        f"peak memory is the {memory_kind} of each method's own process",
        config["note"],
    ]
    selection = report.get("selection")
    if selection:
        lines.append(
            f"selection: {selection['selection_s']:.2f} s ({selection['selection_cpu_s']:.2f} s "
            f"CPU time) for {config['source_domains']} source domains with "
            f"selection_batches={config['selection_batches']}; "
            f"{selection['mask_size']} of {selection['candidate_weights']:,} candidate "
            f"weights, lowest masked block {selection['lowest_masked_block']}")
    for row in report["results"]:
        for note in row.get("notes") or []:
            lines.append(f"{row['method']}: {note}")
        if row.get("checkpoint_source"):
            lines.append(f"{row['method']} checkpoint: {row['checkpoint_source']}")
    return "\n".join(lines) + "\n\n" + format_table(report)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # open_clip logs every model build at INFO on the root logger, so only
    # this package's messages go down to --log_level.
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("jps_domainbed").setLevel(args.log_level)
    validate_args(parser, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args._worker is not None:
        if not args._workdir:
            parser.error("--_worker needs --_workdir")
        return worker_main(args)

    report = run_benchmark(args)
    print(format_report(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
        logger.info("wrote %s", args.json_path)
    failed = [row["method"] for row in report["results"] if row.get("error")]
    if failed:
        logger.error("measurement failed for %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

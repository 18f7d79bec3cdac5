"""Typed configuration of one run, validated on construction and written to the run dir.

This file holds no training logic. `RunConfig.from_dict` reads a `config.json` back; unknown
keys or bad values raise `UserError` (never a traceback at the CLI).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import json
import math
import numbers
import os
import re
from pathlib import Path

from edgetrain.errors import UserError
from edgetrain.storage.atomic import atomic_write_text

MODES = ("e2e", "parallel", "sequential", "multilap")
SPLITS = ("depth", "memory")
TAU_SCHEDULES = ("constant", "midpoint", "multipliers")
TRANSPORT_SCALINGS = ("mean", "sample")
HEADS = ("auto", "dgl", "dgl-light", "linear", "mlp")
OPTIMIZERS = ("sgd", "adamw")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # auto: bf16 where native (#29), resolved at the edge
# the activation cache's storage dtype when --cache-dtype is not given: the precision's own
# 2-byte type (fp32 keeps float16, the default before --precision existed)
CACHE_DTYPE_OF_PRECISION = {"fp32": "float16", "bf16": "bfloat16", "fp16": "float16"}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name} must be one of {', '.join(choices)} (got {value!r})")


@dataclass
class RunConfig:
    """Everything that defines a run. Defaults are the product's main path (multi-lap TRGL).

    Learning rates, momentum, weight decay, label smoothing and orthogonal init follow the
    options of the paper's Appendix E; the defaults are tuned for the embedded `digits` set.
    """

    # data
    data: str = "digits"
    train_size: int | None = None  # stratified, seeded subset of the training split
    val_fraction: float = 0.1  # carved from the training split, stratified
    test_size: int | None = None  # fixed stratified subset of the test split (quick benchmarks)
    input_shape: tuple[int, int, int] | None = None  # only for `synthetic`
    synthetic_size: int = 512  # number of training samples of `synthetic`
    augment: bool = True
    # model and split
    model: str = "kmresnet"
    width: int | None = None  # base width; None = the model's default
    depth: int | None = None  # number of blocks for models that take it
    modules: int = 4
    split: str = "depth"
    head: str = "auto"  # auto: dgl, or dgl-light on maps over 256 channels (resolved per module)
    # regime
    mode: str = "multilap"
    laps: int = 2
    epochs: int = 8  # per module (sequential/multilap: total over laps) or total (e2e/parallel)
    # transport
    transport: bool = True
    tau: float = 1.0
    tau_schedule: str = "midpoint"
    transport_scaling: str = "mean"
    mult_h: float = 1.0
    mult_s: int = 50
    mult_lambda1: float = 1.0
    # optimisation (Appendix E)
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 2e-4
    label_smoothing: float = 0.0
    init_gain: float | None = None  # orthogonal init gain; None keeps PyTorch's default
    cosine: bool = True
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    # mixed precision (#17): the forward under autocast, fp32 master weights
    precision: str = "fp32"
    precision_requested: str | None = None  # "auto" when `precision` was resolved from it (#29)
    # out-of-core (sequential / multilap); cache_dtype None: follows the precision
    # (`CACHE_DTYPE_OF_PRECISION`), resolved on construction so config.json names it
    cache_dtype: str | None = None
    cache_dir: str | None = None
    cache_views: int = 1
    prefetch_mib: float = 64.0
    # memory budget (bytes); None = unlimited
    memory_budget: int | None = None
    # torch.distributed (parallel only): one rank per group of modules, launched by torchrun
    distributed: bool = False
    buffer_size: int = 0  # activation batches buffered per direction per rank; 0 = synchronous
    # recomputation inside the trained module(s) (#18): none, blocks, or segments:S
    recompute: str = "none"
    # fine-tuning (issue #16): pretrained weights, the modules that train, a subset of classes
    init: str | None = None  # safetensors / weights-only state dict / edgetrain RUN_DIR
    init_strict: bool = True  # every key must match (else load what matches and report the rest)
    train_modules: tuple[int, int] | None = None  # (A, B), 1-based inclusive; None = all
    classes: tuple[str, ...] | None = None  # keep these classes (names, or indices by classes_by)
    classes_by: str = "name"
    # image folders and the data pack (issue 15); `data` naming a directory is a folder
    data_cache: str | None = None  # where packs live (default ~/.cache/edgetrain/data)
    image_size: tuple[int, int] | None = None  # (H, W): resize short side, centre crop
    channels: int | None = None  # 1 or 3; None: 3 when any image of the folder is in colour
    flip: bool | None = None  # flips label-preserving; None: the data set's own (folders: off)
    skip_bad_images: bool = False  # skip (and count) corrupt images instead of stopping
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cache_dtype is None and self.precision != "auto":  # auto: once resolved
            self.cache_dtype = CACHE_DTYPE_OF_PRECISION.get(str(self.precision), "float16")
        _check_types(self)  # wrong types and non-finite floats first: the checks below compare
        if os.path.isdir(self.data):  # config.json names the folder by its absolute path
            self.data = str(Path(self.data).resolve())
        if self.data_cache:  # and the data cache: eval, --resume, --init
            self.data_cache = str(Path(self.data_cache).expanduser().resolve())  # from any cwd
        self.image_size = parse_image_size(self.image_size)
        _check(self.channels in (None, 1, 3), f"--channels must be 1 or 3 (got {self.channels})")
        if self.input_shape is not None:
            self.input_shape = tuple(int(v) for v in self.input_shape)
        _check_choice("--mode", self.mode, MODES)
        _check_choice("--split", self.split, SPLITS)
        _check_choice("--tau-schedule", self.tau_schedule, TAU_SCHEDULES)
        _check_choice("--transport-scaling", self.transport_scaling, TRANSPORT_SCALINGS)
        for kind in str(self.head).split(","):
            _check_choice("--head", kind, HEADS if "," not in str(self.head) else HEADS[1:])
        _check_choice("--optimizer", self.optimizer, OPTIMIZERS)
        if self.cache_dtype is not None or self.precision != "auto":
            _check_choice("--cache-dtype", self.cache_dtype, CACHE_DTYPES)
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_choice("--device", self.device, DEVICES)
        _check(self.precision_requested in (None, "auto"),
               f"precision_requested must be null or \"auto\" (got {self.precision_requested!r})")
        _check(self.modules >= 1, f"--modules must be >= 1 (got {self.modules})")
        _check(self.epochs >= 1, f"--epochs must be >= 1 (got {self.epochs})")
        _check(self.laps >= 1, f"--laps must be >= 1 (got {self.laps})")
        if self.mode == "multilap":
            _check(self.epochs % self.laps == 0,
                   f"--epochs ({self.epochs}) must be a multiple of --laps ({self.laps}): "
                   "each lap trains every module for epochs/laps epochs")
        if self.transport and self.tau_schedule != "multipliers":
            _check(self.tau > 0, f"--tau must be > 0 with transport on (got {self.tau})")
        _check(self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})")
        _check(self.lr > 0, f"--lr must be > 0 (got {self.lr})")
        _check(0.0 <= self.val_fraction < 1.0, f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        _check(0.0 <= self.label_smoothing < 1.0, "--label-smoothing must be in [0, 1)")
        _check(self.weight_decay >= 0, "--weight-decay must be >= 0")
        _check(0.0 <= self.momentum < 1.0, "--momentum must be in [0, 1)")
        _check(self.train_size is None or self.train_size >= 1, "--train-size must be >= 1")
        _check(self.test_size is None or self.test_size >= 1, "--test-size must be >= 1")
        _check(self.width is None or self.width >= 1, "--width must be >= 1")
        _check(self.depth is None or self.depth >= 1, "--depth must be >= 1")
        _check(self.cache_views >= 1, "--cache-views must be >= 1")
        _check(self.prefetch_mib > 0, "--prefetch-mib must be > 0")
        _check(self.mult_s >= 1, "--mult-s must be >= 1")
        _check(self.synthetic_size >= 2, "--synthetic-size must be >= 2")
        _check(self.memory_budget is None or self.memory_budget > 0, "--memory-budget must be > 0")
        _check(self.buffer_size >= 0, f"--buffer-size must be >= 0 (got {self.buffer_size})")
        _check(not self.distributed or self.mode == "parallel",
               f"--distributed needs --mode parallel (got {self.mode!r})")
        _check(not self.distributed or self.memory_budget is None,
               "--memory-budget / --device-profile are not enforced per rank with --distributed")
        _check(bool(re.fullmatch(r"none|blocks|segments:[1-9]\d*", str(self.recompute))),
               f"--recompute must be none, blocks or segments:S with S >= 1 (got {self.recompute!r})")
        self._check_finetune()
        if self.input_shape is not None:
            _check(len(self.input_shape) == 3 and all(v >= 1 for v in self.input_shape),
                   f"--input must be CxHxW with positive sizes (got {self.input_shape})")

    def _check_finetune(self) -> None:
        """Issue #16's fields: `train_modules` 'A:B' or (A, B), `classes` 'a,b' or a list."""
        _check(self.init is None or isinstance(self.init, str), f"--init must be a path (got {self.init!r})")
        _check(isinstance(self.init_strict, bool), "init_strict must be true or false")
        _check(self.train_modules is None or isinstance(self.train_modules, (str, list, tuple)),
               f"--train-modules must look like A:B (got {self.train_modules!r})")
        _check(self.classes is None or isinstance(self.classes, (str, list, tuple)),
               f"--classes must be a comma-separated list (got {self.classes!r})")
        if isinstance(self.train_modules, str):
            self.train_modules = parse_range(self.train_modules)
        if self.train_modules is not None:
            _check(len(self.train_modules) == 2, "--train-modules must look like A:B")
            a, b = (int(v) for v in self.train_modules)
            self.train_modules = (a, b)
            _check(1 <= a <= b, f"--train-modules {a}:{b} is empty or reversed (1-based A:B, "
                   "A <= B)")
            _check(b <= self.modules, f"--train-modules {a}:{b} goes past the {self.modules} "
                   "modules (-K)")
        if isinstance(self.classes, str):
            self.classes = tuple(c.strip() for c in self.classes.split(",") if c.strip())
        if self.classes is not None:
            self.classes = tuple(str(c) for c in self.classes)
            _check(len(self.classes) >= 2, "--classes needs at least two classes")
            _check(len(set(self.classes)) == len(self.classes), "--classes lists a class twice")
        _check_choice("--classes-by", self.classes_by, ("name", "index"))
        if self.classes_by == "index" and self.classes is not None:
            _check(all(c.isdigit() for c in self.classes),
                   f"--classes-by index needs integer indices (got {','.join(self.classes)})")

    @property
    def epochs_per_lap(self) -> int:
        """Epochs each module trains per lap (sequential is one lap of `epochs`)."""
        return self.epochs // self.laps if self.mode == "multilap" else self.epochs

    @property
    def out_of_core(self) -> bool:
        """Sequential / multilap runs go through the module store and the activation cache,
        unless `extra["in_memory"]` asks for the in-memory `PrefixSource` path (the baseline
        of `edgetrain bench speed` and of the cache-equivalence test)."""
        return self.mode in ("sequential", "multilap") and not self.extra.get("in_memory", False)

    @property
    def n_laps(self) -> int:
        return self.laps if self.mode == "multilap" else 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        _check(not unknown, f"unknown configuration keys: {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:  # wrong value types in a hand-edited file
            raise UserError(f"invalid configuration: {e}") from None

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        path = Path(path)
        _check(path.is_file(), f"no config.json in {path.parent}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        _check(isinstance(d, dict), f"{path} must hold a JSON object")
        return cls.from_dict(d)


def parse_range(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4); 'A' alone is A:A."""
    parts = text.split(":")
    try:
        vals = tuple(int(v) for v in parts)
    except ValueError:
        raise UserError(f"--train-modules must look like A:B, e.g. 2:4 (got {text!r})") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2:
        raise UserError(f"--train-modules must look like A:B, e.g. 2:4 (got {text!r})")
    return vals


_FLOAT_FIELDS = ("val_fraction", "tau", "mult_h", "mult_lambda1", "lr", "momentum", "weight_decay",
                 "label_smoothing", "init_gain", "prefetch_mib")
_INT_FIELDS = ("train_size", "test_size", "synthetic_size", "width", "depth", "modules", "laps",
               "epochs", "mult_s", "batch_size", "seed", "cache_views", "memory_budget",
               "buffer_size")
_BOOL_FIELDS = ("augment", "transport", "cosine", "distributed")
_STR_FIELDS = ("data", "model", "split", "head", "mode", "tau_schedule", "transport_scaling",
               "optimizer", "device", "cache_dtype", "precision")


def _flag(name: str) -> str:
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _check_types(cfg: "RunConfig") -> None:
    """Every field of its type (a hand-edited config.json may hold anything), every float
    finite: an infinite --tau silently drops the transport term, a NaN passes every `>`."""
    for name in _FLOAT_FIELDS:
        v = getattr(cfg, name)
        if v is None and name == "init_gain":
            continue
        _check(isinstance(v, numbers.Real) and not isinstance(v, bool),
               f"{_flag(name)} must be a number (got {v!r})")
        _check(math.isfinite(v), f"{_flag(name)} must be a finite number (got {v!r})")
    for name in _INT_FIELDS:
        v = getattr(cfg, name)
        _check(v is None and name in ("train_size", "test_size", "width", "depth", "memory_budget")
               or isinstance(v, numbers.Integral) and not isinstance(v, bool),
               f"{_flag(name)} must be an integer (got {v!r})")
    for name in _BOOL_FIELDS:
        _check(isinstance(getattr(cfg, name), bool),
               f"{name} must be true or false (got {getattr(cfg, name)!r})")
    for name in _STR_FIELDS:
        _check(isinstance(getattr(cfg, name), str) or name == "cache_dtype" and cfg.precision
               == "auto" and cfg.cache_dtype is None,
               f"{_flag(name)} must be a string (got {getattr(cfg, name)!r})")
    _check(cfg.cache_dir is None or isinstance(cfg.cache_dir, str),
           f"--cache-dir must be a path (got {cfg.cache_dir!r})")
    _check(cfg.data_cache is None or isinstance(cfg.data_cache, str),
           f"--data-cache must be a path (got {cfg.data_cache!r})")
    _check(isinstance(cfg.extra, dict), f"extra must be a JSON object (got {cfg.extra!r})")
    _check(cfg.input_shape is None or isinstance(cfg.input_shape, (list, tuple))
           and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                   for v in cfg.input_shape),
           f"--input must be CxHxW integers (got {cfg.input_shape!r})")


def parse_shape(text: str | None) -> tuple[int, int, int] | None:
    """'3x32x32' -> (3, 32, 32)."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--input must look like CxHxW, e.g. 3x32x32 (got {text!r})") from None
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--input must look like CxHxW with positive sizes (got {text!r})")
    return shape


def parse_image_size(value) -> tuple[int, int] | None:
    """'64x48' (HxW), '64' (square) or a pair -> (64, 48)."""
    if value is None:
        return None
    try:
        parts = tuple(int(v) for v in (str(value).lower().split("x") if isinstance(value, str)
                                       else value))
    except (ValueError, TypeError):
        raise UserError(f"--image-size must look like HxW, e.g. 64x64 (got {value!r})") from None
    parts = parts * 2 if len(parts) == 1 else parts
    if len(parts) != 2 or min(parts) < 1:
        raise UserError(f"--image-size must look like HxW with positive sizes (got {value!r})")
    return parts


# ------------------------------------------------------------- the command line's spelling
# How RunConfig fields are spelled as `edgetrain train` options: the one mapping, read both
# ways (`config_from_options` for the CLI, `option_args` for the planner's printed command).
FLAG_NAMES = {"input_shape": "--input", "modules": "-K"}


def config_from_options(opts: dict) -> RunConfig:
    """A RunConfig from `edgetrain train`'s parsed options (`--input CxHxW`, `--no-transport`)."""
    opts = dict(opts)
    opts["input_shape"] = parse_shape(opts.get("input_shape"))
    opts["transport"] = not opts.pop("no_transport")
    return RunConfig(**opts)


def option_args(name: str, value) -> list[str]:
    """The `edgetrain train` arguments that set field `name` to `value`."""
    flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
    if name == "transport":
        return [] if value else ["--no-transport"]
    if isinstance(value, bool):
        return [flag if value else f"--no-{name.replace('_', '-')}"]
    if name in ("input_shape", "image_size"):
        return [flag, "x".join(str(v) for v in value)]
    if name == "train_modules":  # issue #16
        return [flag, f"{value[0]}:{value[1]}"]
    if name == "classes":
        return [flag, ",".join(value)]
    return [flag, str(value)]

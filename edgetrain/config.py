"""Typed configuration of one run: `RunConfig`, grouped by concern, validated on construction.

Every field carries its group, its one-line doc and its command-line spelling (`opt`); the
`edgetrain train` / `plan` options (`edgetrain.options.command`) and the TOML file of
`--config` / `--print-config` (`edgetrain.options.file`) are generated from them. This file
holds no training logic. `RunConfig.from_dict` reads a `config.json` back (the flat layout of
0.1.0, `extra` included); unknown keys or bad values raise `UserError`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import json
import math
import numbers
import os
import re
import typing
from pathlib import Path

from edgetrain.errors import UserError
from edgetrain.registry import DATASET_NAMES, MODEL_NAMES
from edgetrain.storage.atomic import atomic_write_text

MODES = ("e2e", "parallel", "sequential", "multilap")
SPLITS = ("depth", "memory")
TAU_SCHEDULES = ("constant", "midpoint", "multipliers")
TRANSPORT_SCALINGS = ("mean", "sample")
HEADS = ("auto", "dgl", "dgl-s2", "dgl-k1", "dgl-light", "linear", "mlp")
OPTIMIZERS = ("sgd", "adamw")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
MEMORY_FORMATS = ("auto", "channels-last", "contiguous")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # auto: bf16 where native (#29), resolved at the edge
# the activation cache's storage dtype when --cache-dtype is not given: the precision's own
# 2-byte type (fp32 keeps float16, the default before --precision existed)
CACHE_DTYPE_OF_PRECISION = {"fp32": "float16", "bf16": "bfloat16", "fp16": "float16"}
# the groups of RunConfig, in the order of the TOML file (one `[section]` each)
GROUPS = ("data", "model", "method", "optimisation", "runtime", "out_of_core", "finetune",
          "budget")
# fields 0.1.0 kept in config.json's `extra` object, and the key each has there
EXTRA_KEYS = {"in_memory": "in_memory", "fit_record": "fit", "device_profile": "device_profile",
              "shared_cpu_gpu_memory": "shared_cpu_gpu_memory"}


def opt(default, group: str, doc: str, *, flags: tuple[str, ...] = (), style: str = "",
        choices: tuple[str, ...] | None = None, cli: bool = True, shown=None, factory=None):
    """A RunConfig field: its default, group and one-line doc, and how the CLI spells it.

    Args:
        default: the default value (`factory` instead for a mutable one).
        group: one of `GROUPS`.
        doc: one line; the option's help text and the TOML file's comment.
        flags: the option's spellings when not `--field-name` (0.1.0's: `-K`, `--input`);
            the last one is what a printed command uses.
        style: for a bool, "pair" (`--x/--no-x`, the default), "on" (`--x` alone) or
            "off" (`--no-x` alone, which sets the field False).
        choices: the values the option accepts (a click Choice).
        cli: False for a field no command-line option sets (written by the library).
        shown: the default as `--help` shows it, when the value itself would mislead.
    """
    meta = {"group": group, "doc": doc, "flags": flags, "style": style, "choices": choices,
            "cli": cli, "shown": shown}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


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
    The fields are flat (`cfg.lr`); each belongs to one group of `GROUPS` (its metadata).
    """

    # ---------------------------------------------------------------- data
    data: str = opt("digits", "data", "data set name (" + ", ".join(DATASET_NAMES) + "), or "
                    "an image folder (one sub-folder per class)")
    train_size: int | None = opt(None, "data", "stratified, seeded subset of the training split")
    val_fraction: float = opt(0.1, "data", "validation share carved from the training split "
                              "(stratified)")
    test_size: int | None = opt(None, "data", "fixed stratified subset of the test split "
                                "(quick benchmarks)")
    input_shape: tuple[int, int, int] | None = opt(None, "data", "CxHxW, for --data synthetic",
                                                   flags=("--input",))
    synthetic_size: int = opt(512, "data", "number of training samples of --data synthetic")
    augment: bool = opt(True, "data", "live augmentation (random crops, and flips where they "
                        "preserve labels)")
    data_cache: str | None = opt(None, "data", "where data sets are packed (default "
                                 "~/.cache/edgetrain/data)")
    image_size: tuple[int, int] | None = opt(None, "data", "HxW for an image folder: resize "
                                             "the short side, centre crop")
    channels: int | None = opt(None, "data", "image folder channels, 1 or 3 (default 3 if any "
                               "image is in colour)", choices=("1", "3"))
    flip: bool | None = opt(None, "data", "horizontal flips preserve labels (default: the data "
                            "set's own; off for folders)")
    skip_bad_images: bool = opt(False, "data", "skip and count corrupt images instead of "
                                "stopping", style="on")
    # ---------------------------------------------------------------- model
    model: str = opt("kmresnet", "model", "network (" + ", ".join(MODEL_NAMES) + ")")
    width: int | None = opt(None, "model", "base width (model default if unset)")
    depth: int | None = opt(None, "model", "number of blocks (kmresnet) or n (resnet)")
    init_gain: float | None = opt(None, "model", "orthogonal init with this gain (unset: "
                                  "PyTorch's default init)")
    # ---------------------------------------------------------------- method
    mode: str = opt("multilap", "method", "regime: end-to-end, parallel, sequential or "
                    "multi-lap sequential", choices=MODES)
    modules: int = opt(4, "method", "number of modules K", flags=("--modules", "-K"))
    split: str = opt("depth", "method", "cut the blocks into modules of equal depth or equal "
                     "memory", choices=SPLITS)
    head: str = opt("auto", "method", "auxiliary head (auto: dgl-k1, the DGL head with a 1x1 "
                    "conv at stride 2; dgl-light on maps over 256 channels; dgl-s2: the 3x3 "
                    "conv at stride 2; dgl: the paper's)", choices=HEADS)
    laps: int = opt(2, "method", "laps of multi-lap sequential training")
    epochs: int = opt(8, "method", "epochs per module (sequential/multilap, all laps together) "
                      "or in all")
    transport: bool = opt(True, "method", "TRGL's transport regularisation (--no-transport: "
                          "VanGL)", style="off")
    tau: float = opt(1.0, "method", "transport weight tau (the penalty is transport / 2 tau)")
    tau_schedule: str = opt("midpoint", "method", "tau constant, doubled for the second half "
                            "of the modules, or the method of multipliers", choices=TAU_SCHEDULES)
    transport_scaling: str = opt("mean", "method", "transport cost: mean(r^2) per block, or "
                                 "the per-sample squared norm", choices=TRANSPORT_SCALINGS)
    mult_h: float = opt(1.0, "method", "method of multipliers: step h")
    mult_s: int = opt(50, "method", "method of multipliers: steps s between updates")
    mult_lambda1: float = opt(1.0, "method", "method of multipliers: first multiplier lambda_1")
    # ---------------------------------------------------------------- optimisation
    optimizer: str = opt("sgd", "optimisation", "optimizer", choices=OPTIMIZERS)
    lr: float = opt(0.05, "optimisation", "learning rate")
    momentum: float = opt(0.9, "optimisation", "SGD momentum")
    weight_decay: float = opt(2e-4, "optimisation", "weight decay")
    label_smoothing: float = opt(0.0, "optimisation", "label smoothing of the cross-entropy")
    cosine: bool = opt(True, "optimisation", "cosine learning-rate decay over each module's "
                       "steps")
    batch_size: int = opt(64, "optimisation", "samples per batch")
    seed: int = opt(0, "optimisation", "seed of the data subsets, the init and the batch order")
    # ---------------------------------------------------------------- runtime
    device: str = opt("auto", "runtime", "where to train (auto: cuda when available)",
                      choices=DEVICES)
    precision: str = opt("fp32", "runtime", "forward under autocast in bf16 or fp16 (fp32 "
                         "master weights; fp16 needs CUDA); auto: bf16 where the device "
                         "computes it natively, else fp32", choices=PRECISIONS)
    precision_requested: str | None = opt(None, "runtime", "\"auto\" when `precision` was "
                                          "resolved from it (written by train)", cli=False)
    memory_format: str = opt("auto", "runtime", "layout of the modules' maps (auto: "
                             "channels-last on CPUs with AVX-512 kernels, where it is faster; "
                             "contiguous: the same results on every CPU)",
                             choices=MEMORY_FORMATS)
    recompute: str = opt("none", "runtime", "recompute activations inside the trained "
                         "module(s) during backward: none, blocks (one checkpoint per block) "
                         "or segments:S")
    compile: bool = opt(False, "runtime", "torch.compile each module's training forward "
                        "(inductor: needs a C++ compiler; pays off on long runs; its cache "
                        "goes under the data cache)", style="on")
    distributed: bool = opt(False, "runtime", "one rank per group of modules (--mode "
                            "parallel, launched by torchrun)", style="on")
    buffer_size: int = opt(0, "runtime", "--distributed: activation batches buffered per "
                           "direction; 0 = synchronous")
    # ---------------------------------------------------------------- out of core
    cache_dtype: str | None = opt(None, "out_of_core", "storage dtype of the activation cache "
                                  "(unset: follows --precision)", choices=CACHE_DTYPES,
                                  shown="float16; bfloat16 with --precision bf16")
    cache_dir: str | None = opt(None, "out_of_core", "activation cache (default RUN_DIR/cache)")
    cache_views: int = opt(1, "out_of_core", "augmented views of the training set stored per "
                           "cache")
    prefetch_mib: float = opt(64.0, "out_of_core", "read-ahead buffer of the data and cache "
                              "readers, MiB (a reader thread runs only when the intra-op "
                              "threads leave a core free)")
    in_memory: bool = opt(False, "out_of_core", "sequential/multilap with every module "
                          "resident and no cache (the recompute baseline; not resumable)",
                          cli=False)
    # ---------------------------------------------------------------- fine-tuning
    init: str | None = opt(None, "finetune", "start from weights: a safetensors file, a "
                           "PyTorch state dict (weights only) or an edgetrain RUN_DIR")
    init_strict: bool = opt(True, "finetune", "every key of --init must match (else load what "
                            "matches, report the rest)")
    train_modules: tuple[int, int] | None = opt(None, "finetune", "A:B, 1-based inclusive: "
                                                "train only these modules (default all)")
    classes: tuple[str, ...] | None = opt(None, "finetune", "comma-separated classes to keep "
                                          "(names, or indices with --classes-by index)")
    classes_by: str = opt("name", "finetune", "--classes names classes by name or by index",
                          choices=("name", "index"))
    # ---------------------------------------------------------------- budget
    device_profile: str | None = opt(None, "budget", "devices/NAME.toml: enforce its memory "
                                     "budget (see `edgetrain devices`)")
    memory_budget: int | None = opt(None, "budget", "resident memory budget, e.g. 1.5GiB "
                                    "(config.json: bytes)")
    shared_cpu_gpu_memory: bool = opt(False, "budget", "the device profile's CPU and GPU share "
                                      "one DRAM (CUDA memory counts against the budget)",
                                      cli=False)
    fit_record: dict | None = opt(None, "budget", "what `train --fit` predicted for the "
                                  "chosen plan (kept beside the run; nothing reads it to train)",
                                  cli=False)

    def __post_init__(self) -> None:
        if self.cache_dtype is None and self.precision != "auto":  # auto: once resolved
            self.cache_dtype = CACHE_DTYPE_OF_PRECISION.get(str(self.precision), "float16")
        if isinstance(self.input_shape, str):  # 'CxHxW', as the command line and a TOML file
            self.input_shape = parse_shape(self.input_shape)
        _check_types(self)  # wrong types and non-finite floats first: the checks below compare
        if os.path.isdir(self.data):  # config.json names the folder by its absolute path
            self.data = str(Path(self.data).resolve())
        if self.data_cache:  # and the data cache: eval, --resume, --init
            self.data_cache = str(Path(self.data_cache).expanduser().resolve())  # from any cwd
        self.image_size = parse_image_size(self.image_size)
        _check(self.channels in (None, 1, 3), f"--channels must be 1 or 3 (got {self.channels})")
        if self.input_shape is not None:
            self.input_shape = tuple(int(v) for v in self.input_shape)
        self._check_choices()
        self._check_ranges()
        self._check_finetune()
        if self.input_shape is not None:
            _check(len(self.input_shape) == 3 and all(v >= 1 for v in self.input_shape),
                   f"--input must be CxHxW with positive sizes (got {self.input_shape})")

    def _check_choices(self) -> None:
        """Every field with choices holds one of them (`--head` may list one head per module)."""
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
        _check_choice("--memory-format", self.memory_format, MEMORY_FORMATS)
        _check(self.precision_requested in (None, "auto"),
               f"precision_requested must be null or \"auto\" (got {self.precision_requested!r})")

    def _check_ranges(self) -> None:
        """Counts, rates and sizes in range, and the cross-field rules."""
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
        _check(not (self.compile and self.distributed),
               "--compile is not supported with --distributed")
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

    def _check_finetune(self) -> None:
        """Issue #16's fields: `train_modules` 'A:B' or (A, B), `classes` 'a,b' or a list."""
        _check(self.train_modules is None or isinstance(self.train_modules, (str, list, tuple)),
               f"--train-modules must look like A:B (got {self.train_modules!r})")
        _check(self.classes is None or isinstance(self.classes, (str, list, tuple)),
               f"--classes must be a comma-separated list (got {self.classes!r})")
        if isinstance(self.train_modules, str):
            self.train_modules = parse_range(self.train_modules)
        if self.train_modules is not None:
            _check(len(self.train_modules) == 2 and all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) or
                isinstance(v, str) and v.isdigit() for v in self.train_modules),
                f"--train-modules must look like A:B (got {self.train_modules!r})")
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
        unless `in_memory` asks for the in-memory `PrefixSource` path (the baseline of
        `edgetrain bench speed` and of the cache-equivalence test)."""
        return self.mode in ("sequential", "multilap") and not self.in_memory

    @property
    def n_laps(self) -> int:
        return self.laps if self.mode == "multilap" else 1

    def to_dict(self) -> dict:
        """config.json's object: 0.1.0's flat keys, the named `EXTRA_KEYS` fields in `extra`."""
        d = dataclasses.asdict(self)
        named = {k: d.pop(k) for k in EXTRA_KEYS}
        d["extra"] = {EXTRA_KEYS[k]: v for k, v in named.items() if v not in (None, False)}
        if named["device_profile"] is not None:  # 0.1.0 wrote the two together
            d["extra"]["shared_cpu_gpu_memory"] = named["shared_cpu_gpu_memory"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """A RunConfig from config.json's object (`to_dict`'s layout, 0.1.0's included)."""
        d = dict(d)
        extra = d.pop("extra", {})
        _check(isinstance(extra, dict), f"extra must be a JSON object (got {extra!r})")
        by_key = {v: k for k, v in EXTRA_KEYS.items()}
        unknown = sorted(set(d) - set(field_names()) | set(extra) - set(by_key))
        _check(not unknown, f"unknown configuration keys: {', '.join(unknown)}")
        d.update({by_key[k]: v for k, v in extra.items()})
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


# ------------------------------------------------------------------- the fields, read back
def field_names() -> list[str]:
    """RunConfig's fields in declaration order (grouped)."""
    return [f.name for f in dataclasses.fields(RunConfig)]


def field_meta(name: str) -> dict:
    """The `opt` metadata of field `name`: group, doc, flags, style, choices, cli, shown."""
    return RunConfig.__dataclass_fields__[name].metadata


def field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of field `name` from its annotation: `int | None` -> (int, True)."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = len(args) < len(typing.get_args(hint))
    base = args[0] if optional and len(args) == 1 else hint
    return typing.get_origin(base) or base, optional


def default_of(name: str):
    """The default value of field `name`."""
    f = RunConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def flag_of(name: str) -> str:
    """How messages and printed commands spell field `name` (`-K`, `--input`, `--lr`)."""
    flags = field_meta(name)["flags"]
    return flags[-1] if flags else "--" + name.replace("_", "-")


_HINTS = typing.get_type_hints(RunConfig)
_NUMBER = {float: ("a number", numbers.Real), int: ("an integer", numbers.Integral)}


def _check_types(cfg: RunConfig) -> None:
    """Every field of its annotated type (a hand-edited config.json or TOML file may hold
    anything), every float finite: an infinite --tau silently drops the transport term, a
    NaN passes every `>`. Tuples are checked by their parsers."""
    for name in field_names():
        v = getattr(cfg, name)
        base, optional = field_type(name)
        if (v is None and optional) or base is tuple:
            continue
        if base in _NUMBER:
            what, kind = _NUMBER[base]
            _check(isinstance(v, kind) and not isinstance(v, bool),
                   f"{flag_of(name)} must be {what} (got {v!r})")
            _check(base is int or math.isfinite(v),
                   f"{flag_of(name)} must be a finite number (got {v!r})")
        elif base is bool:
            _check(isinstance(v, bool), f"{name} must be true or false (got {v!r})")
        elif base is str:
            kind = "a path" if name in PATH_FIELDS else "a string"
            _check(isinstance(v, str), f"{flag_of(name)} must be {kind} (got {v!r})")
        else:
            _check(isinstance(v, base), f"{name} must be a JSON object (got {v!r})")
    _check(cfg.input_shape is None or isinstance(cfg.input_shape, (list, tuple))
           and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                   for v in cfg.input_shape),
           f"--input must be CxHxW integers (got {cfg.input_shape!r})")


PATH_FIELDS = ("cache_dir", "data_cache", "init")
# the budget options: `edgetrain train` resolves them through the device profile
# (`edgetrain.budget.guard.apply_budget_options`), not as plain values
BUDGET_FIELDS = ("device_profile", "memory_budget")


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
def config_from_options(opts: dict) -> RunConfig:
    """A RunConfig from `edgetrain train`'s parsed options (`--input CxHxW`, `--no-transport`)."""
    opts = dict(opts)
    if "no_transport" in opts:
        opts["transport"] = not opts.pop("no_transport")
    return RunConfig(**opts)


def option_args(name: str, value) -> list[str]:
    """The `edgetrain train` arguments that set field `name` to `value`."""
    flag = flag_of(name)
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

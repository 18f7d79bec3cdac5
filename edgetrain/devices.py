"""Device profiles (`devices/*.toml`), memory budgets, the planner and the RSS watchdog.

What this file is: reading and validating the device profiles; parsing budgets such as
"1.5GiB"; `plan`, which searches regime, K, split, batch size and cache dtype for the
configuration that fits a budget (the rule is in `plan`'s docstring and the README);
`check_fits`, the pre-flight check of `edgetrain train`; and `RssWatchdog`, which stops a
run cleanly before the process outgrows its budget.

What it is not: a memory model. Every predicted byte comes from `edgetrain.memory`
(`predict_peak`, `runtime_baseline_bytes`); this file only searches over it.
"""
from __future__ import annotations

import dataclasses
import math
import re
import shlex
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgetrain.config import CACHE_DTYPES, RunConfig
from edgetrain.errors import UserError

MIB = 1024 * 1024
GIB = 1024 * MIB
DEVICES_DIR = Path(__file__).resolve().parent.parent / "devices"
# A plan fits when runtime + SAFETY x predicted tensor peak + HEADROOM_BYTES <= budget. The
# margin covers what the predictor does not see yet (allocator fragmentation, conv
# workspaces, the cache's mapped pages, thread buffers): the measured tensor peaks on this
# machine were 1.6-5.4x the predicted ones; the largest overrun, 3.4x or 1.9 GiB, was a
# ResNet-110 at 96x96 (benchmarks/results/plan_vs_measured.md). Lower both as the
# predictor of edgetrain.memory improves.
SAFETY = 3.5
HEADROOM_BYTES = 320 * 1024 * 1024
GOOD_BATCH = 32  # batches below this are tried only when nothing fits at GOOD_BATCH or above
MIN_BATCH = 8
ACCELERATORS = ("none", "cuda")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")

# field -> accepted types (bool is checked apart: it is a subclass of int)
PROFILE_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,), "description": (str,), "total_memory_mib": (int,), "reserved_mib": (int,),
    "shared_cpu_gpu_memory": (bool,), "accelerator": (str,), "accelerator_name": (str,),
    "storage": (str,), "storage_read_mib_s": (int, float), "storage_write_mib_s": (int, float),
    "cache_dtype": (str,), "estimated": (list,), "sources": (list,), "notes": (str,),
}
NUMERIC_FIELDS = ("total_memory_mib", "reserved_mib", "storage_read_mib_s", "storage_write_mib_s")


# --------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class DeviceProfile:
    """One device kind, as read from `devices/NAME.toml` (units in the field names)."""

    name: str
    description: str
    total_memory_mib: int
    reserved_mib: int  # the OS, its services and (Jetson) the CUDA context: not ours to use
    shared_cpu_gpu_memory: bool
    accelerator: str  # "cuda" or "none"
    accelerator_name: str
    storage: str
    storage_read_mib_s: float
    storage_write_mib_s: float
    cache_dtype: str
    estimated: tuple[str, ...]  # fields whose values are estimates, not published figures
    sources: tuple[str, ...]
    notes: str

    @property
    def budget_bytes(self) -> int:
        """What the training process may hold resident: total minus reserved."""
        return (self.total_memory_mib - self.reserved_mib) * MIB

    @property
    def train_device(self) -> str:
        return "cuda" if self.accelerator == "cuda" else "cpu"


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"malformed device profile {path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read device profile {path}: {e}") from None


def _check_field_types(d: dict, path: Path) -> None:
    missing = [k for k in PROFILE_FIELDS if k not in d]
    unknown = sorted(set(d) - set(PROFILE_FIELDS))
    if missing or unknown:
        raise UserError(f"device profile {path}: missing fields {missing or 'none'}, "
                        f"unknown fields {unknown or 'none'}")
    for key, types in PROFILE_FIELDS.items():
        v = d[key]
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            raise UserError(f"device profile {path}: {key} must be "
                            f"{' or '.join(t.__name__ for t in types)} (got {v!r})")
    for key in ("estimated", "sources"):
        if not all(isinstance(s, str) for s in d[key]):
            raise UserError(f"device profile {path}: {key} must be a list of strings")


def _check_field_values(d: dict, path: Path) -> None:
    def bad(msg: str) -> UserError:
        return UserError(f"device profile {path}: {msg}")
    if d["name"] != path.stem:
        raise bad(f"name {d['name']!r} must equal the file name {path.stem!r}")
    if any(d[k] <= 0 for k in NUMERIC_FIELDS):
        raise bad(f"{', '.join(NUMERIC_FIELDS)} must all be > 0")
    if d["reserved_mib"] >= d["total_memory_mib"]:
        raise bad("reserved_mib must be smaller than total_memory_mib")
    if d["accelerator"] not in ACCELERATORS:
        raise bad(f"accelerator must be one of {', '.join(ACCELERATORS)}")
    if d["cache_dtype"] not in CACHE_DTYPES:
        raise bad(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}")
    if not set(d["estimated"]) <= set(NUMERIC_FIELDS):
        raise bad(f"estimated may name only {', '.join(NUMERIC_FIELDS)}")
    if not all(s.startswith("https://") for s in d["sources"]):
        raise bad("sources must be https:// addresses")


def read_profile(path: Path) -> DeviceProfile:
    """Read and validate one profile file.

    Raises:
        UserError: unreadable or malformed TOML, a missing, unknown or ill-typed field.
    """
    path = Path(path)
    d = _load_toml(path)
    _check_field_types(d, path)
    _check_field_values(d, path)
    d["estimated"], d["sources"] = tuple(d["estimated"]), tuple(d["sources"])
    return DeviceProfile(**d)


def profile_names(root: Path | None = None) -> list[str]:
    """Names of the profiles in `root` (default: the repository's `devices/`)."""
    root = Path(root or DEVICES_DIR)
    return sorted(p.stem for p in root.glob("*.toml"))


def load_profile(name: str, root: Path | None = None) -> DeviceProfile:
    """The profile called `name`.

    Raises:
        UserError: no such profile, or the file is malformed.
    """
    root = Path(root or DEVICES_DIR)
    path = root / f"{name}.toml"
    if not _NAME_RE.match(name) or not path.is_file():
        known = ", ".join(profile_names(root)) or f"none in {root}"
        raise UserError(f"unknown device profile {name!r}; known profiles: {known}")
    return read_profile(path)


def list_profiles(root: Path | None = None) -> list[DeviceProfile]:
    """Every profile in `root`, validated (a malformed file raises `UserError`)."""
    return [load_profile(n, root) for n in profile_names(root)]


# --------------------------------------------------------------------------- sizes
_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": MIB, "mib": MIB, "mb": 10**6,
          "g": GIB, "gib": GIB, "gb": 10**9, "t": 1024 * GIB, "tib": 1024 * GIB, "tb": 10**12}


def parse_size(text: str) -> int:
    """'1.5GiB' -> bytes. KiB/MiB/GiB and bare K/M/G are binary, KB/MB/GB decimal.

    Raises:
        UserError: not a positive size.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--memory-budget must be a positive size such as 1.5GiB or 800MB "
                        f"(got {text!r})")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    """Bytes as a short human string (binary units)."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------- planner
@dataclass
class Plan:
    """A configuration that fits (or, when `fits` is False, the least demanding one)."""

    cfg: RunConfig
    prediction: object  # edgetrain.memory.PeakPrediction
    baseline_bytes: int
    needed_bytes: int  # baseline + SAFETY * predicted tensor peak + HEADROOM_BYTES
    budget_bytes: int
    fits: bool
    profile: DeviceProfile | None
    tried: int  # configurations evaluated

    def command(self) -> str:
        """The exact `edgetrain train` command that runs this plan under its budget."""
        return train_command(self.cfg, self.profile)


def needed_bytes(pred, baseline_bytes: int) -> int:
    """Resident bytes a configuration is planned to need: runtime plus padded tensor peak."""
    return baseline_bytes + math.ceil(pred.peak_bytes * SAFETY) + HEADROOM_BYTES


def check_runtime_fits(budget_bytes: int, baseline_bytes: int) -> None:
    """Raises `UserError` when the budget cannot even hold the runtime itself."""
    if budget_bytes <= baseline_bytes:
        raise UserError(f"memory budget {fmt_bytes(budget_bytes)} is below the runtime itself "
                        f"({fmt_bytes(baseline_bytes)} resident after importing PyTorch)")


def _batches(max_batch: int) -> tuple[list[int], list[int]]:
    sizes, b = [], max_batch
    while b >= MIN_BATCH:
        sizes.append(b)
        b //= 2
    sizes = sizes or [max_batch]
    good = [b for b in sizes if b >= GOOD_BATCH] or sizes[:1]
    return good, [b for b in sizes if b not in good]


def _module_counts(n_blocks: int) -> list[int]:
    ks, k = [], 2
    while k < n_blocks:
        ks.append(k)
        k *= 2
    return ks + [n_blocks] if n_blocks >= 2 else []


def _dtypes(preferred: str) -> list[str]:
    # the preferred storage dtype first, then a smaller one when there is one
    return [preferred] + (["float16"] if preferred == "float32" else [])


def _groups(base: RunConfig, n_blocks: int, cache_dtype: str):
    """(mode, K) groups in order of preference, each with its variants (split, cache dtype)."""
    yield "e2e", 1, [("depth", base.cache_dtype)]
    ks = _module_counts(n_blocks)
    for mode in ("parallel", "multilap"):
        dts = _dtypes(cache_dtype) if mode == "multilap" else [base.cache_dtype]
        for k in ks:
            splits = ("depth", "memory") if k < n_blocks else ("depth",)  # K = blocks: one split
            yield mode, k, [(split, dt) for split in splits for dt in dts]


def _config(base: RunConfig, mode: str, k: int, batch: int, variant) -> RunConfig:
    split, dtype = variant
    return dataclasses.replace(base, mode=mode, modules=k, batch_size=batch, split=split,
                               cache_dtype=dtype)


def _count_blocks(cfg: RunConfig, input_shape, num_classes: int) -> int:
    from edgetrain.models import create_model
    net = create_model(cfg.model, tuple(input_shape), num_classes, cfg.width, cfg.depth)
    return len(net.blocks)


class _Evaluator:
    """Predicts and remembers every configuration tried; keeps the least demanding one."""

    def __init__(self, input_shape, num_classes, n_train, budget_bytes, profile, baseline):
        from edgetrain.memory import predict_peak
        self._predict = lambda cfg: predict_peak(cfg, tuple(input_shape), num_classes, n_train)
        self.budget_bytes, self.profile, self.baseline = budget_bytes, profile, baseline
        self.tried, self.least = 0, None

    def __call__(self, cfg: RunConfig) -> Plan:
        pred = self._predict(cfg)
        self.tried += 1
        need = needed_bytes(pred, self.baseline)
        p = Plan(cfg, pred, self.baseline, need, self.budget_bytes, need <= self.budget_bytes,
                 self.profile, 0)
        if self.least is None or need < self.least.needed_bytes:
            self.least = p
        return p


def _search(base: RunConfig, n_blocks: int, cache_dtype: str, evaluate: _Evaluator):
    good, small = _batches(base.batch_size)
    for tier in (good, small):
        for mode, k, variants in _groups(base, n_blocks, cache_dtype):
            # memory grows with the batch: a variant that misses at the tier's smallest
            # batch misses at every larger one, so only the survivors are tried further
            at_min = [evaluate(_config(base, mode, k, tier[-1], v)) for v in variants]
            alive = [v for v, p in zip(variants, at_min) if p.fits]
            for b in tier[:-1]:
                for v in alive:
                    p = evaluate(_config(base, mode, k, b, v))
                    if p.fits:
                        return p
            if alive:
                return at_min[variants.index(alive[0])]
    return None


def plan(base: RunConfig, input_shape, num_classes: int, n_train: int | None,
         budget_bytes: int, profile: DeviceProfile | None = None) -> Plan:
    """Choose the configuration with the best expected accuracy/speed that fits the budget.

    The rule, first match wins: batches of at least GOOD_BATCH (from `base.batch_size`
    halving down) are tried before smaller ones (down to MIN_BATCH); within that, end-to-end
    is preferred (the most accurate), then parallel, then multi-lap sequential (one module
    resident); within a regime the smallest K (closer to end-to-end), then the largest
    batch, then the depth split before the memory-balanced one, then the profile's cache
    dtype before a smaller one. A configuration fits when `needed_bytes` (runtime baseline,
    SAFETY times the predicted tensor peak, HEADROOM_BYTES) is within the budget. Predicted
    memory is taken to grow with the batch size, which prunes the search.

    Returns:
        The first fitting plan; if none fits, the plan that needs the least memory, with
        `fits=False` (its `needed_bytes` is the smallest budget that would do).

    Raises:
        UserError: a budget below the runtime itself, or a bad model/configuration.
    """
    from edgetrain.memory import runtime_baseline_bytes
    baseline = runtime_baseline_bytes()
    check_runtime_fits(budget_bytes, baseline)
    dtype = profile.cache_dtype if profile else base.cache_dtype
    evaluate = _Evaluator(input_shape, num_classes, n_train, budget_bytes, profile, baseline)
    n_blocks = _count_blocks(base, input_shape, num_classes)
    chosen = _search(base, n_blocks, dtype, evaluate) or evaluate.least
    chosen.tried = evaluate.tried
    return chosen


def plan_for_device(base: RunConfig, profile: DeviceProfile | None,
                    budget_bytes: int | None = None) -> Plan:
    """Read the data set's shape (synthetic: `base.input_shape`) and plan for `profile`
    (its budget and device) or, without one, for `budget_bytes`.

    Raises:
        UserError: neither a profile nor a budget, or whatever `plan` raises.
    """
    from edgetrain.schedule import load_data
    if profile is None and budget_bytes is None:
        raise UserError("planning needs a device profile or a memory budget")
    if profile is not None:
        base = dataclasses.replace(base, device=profile.train_device)
    shape, classes, n_train = data_shape(base, load_data)
    return plan(base, shape, classes, n_train, budget_bytes or profile.budget_bytes, profile)


def data_shape(cfg: RunConfig, load_data) -> tuple[tuple[int, int, int], int, int]:
    """(input shape, number of classes, training samples) of the run's data."""
    if cfg.data == "synthetic" and cfg.input_shape is not None:
        return tuple(cfg.input_shape), 10, cfg.train_size or cfg.synthetic_size
    data = load_data(cfg)
    return data.input_shape, data.num_classes, len(data.train)


# --------------------------------------------------------------------------- output
_OPTION_NAMES = {"input_shape": "--input", "modules": "-K"}
_ALWAYS = ("data", "model", "mode", "modules", "split", "batch_size", "epochs")


def train_command(cfg: RunConfig, profile: DeviceProfile | None = None) -> str:
    """`edgetrain train ...` reproducing `cfg`: the planned fields plus every non-default one."""
    default, args = RunConfig(), ["edgetrain", "train"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in ("extra", "memory_budget", "transport") or (
                f.name not in _ALWAYS and v == getattr(default, f.name)):
            continue
        if cfg.mode != "multilap" and f.name in ("laps", "cache_dtype", "cache_views"):
            continue
        args += _option(f.name, v)
    if not cfg.transport:
        args.append("--no-transport")
    if profile is not None:
        args += ["--device-profile", profile.name]
    elif cfg.memory_budget is not None:
        args += ["--memory-budget", str(cfg.memory_budget)]
    return shlex.join(args)


def _option(name: str, value) -> list[str]:
    flag = _OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
    if isinstance(value, bool):
        return [flag if value else f"--no-{name.replace('_', '-')}"]
    if name == "input_shape":
        return [flag, "x".join(str(v) for v in value)]
    return [flag, str(value)]


def format_plan(p: Plan) -> str:
    """A human-readable plan: device, choice, predicted peak per phase, cache disk, command."""
    c, pr = p.cfg, p.prediction
    lines = []
    if p.profile is not None:
        lines.append(f"device      {p.profile.name}: {p.profile.description}")
    lines.append(f"budget      {fmt_bytes(p.budget_bytes)} for the training process")
    split = f", split {c.split}" if c.mode != "e2e" else ""
    cache = f", cache {c.cache_dtype}" if c.mode == "multilap" else ""
    lines.append(f"plan        {c.mode}, K={c.modules}{split}, batch {c.batch_size}{cache}"
                 f"  ({p.tried} configurations evaluated)")
    rows = [("runtime baseline", p.baseline_bytes), ("parameters", pr.params_bytes),
            ("gradients", pr.grads_bytes), ("optimizer state", pr.optimizer_bytes),
            ("saved activations", pr.activations_bytes), ("input batch", pr.input_batch_bytes),
            ("prefetch buffer", pr.prefetch_bytes), ("phase: train step", pr.train_step_bytes),
            ("phase: cache write", pr.cache_write_bytes), ("phase: eval", pr.eval_bytes),
            ("peak (tensors)", pr.peak_bytes),
            (f"needed (runtime + {SAFETY:g} x peak + {HEADROOM_BYTES // MIB} MiB)",
             p.needed_bytes)]
    lines.append(f"predicted   heaviest module: {pr.heaviest_module}")
    lines += [f"            {k:<44} {fmt_bytes(v):>11}" for k, v in rows]
    lines.append(f"cache disk  {fmt_bytes(pr.cache_disk_bytes)}" + _disk_time(p))
    return "\n".join(lines)


def _disk_time(p: Plan) -> str:
    if p.profile is None or not p.prediction.cache_disk_bytes:
        return ""
    mib = p.prediction.cache_disk_bytes / MIB
    return (f" (one pass: write ~{mib / p.profile.storage_write_mib_s:.0f} s, "
            f"read ~{mib / p.profile.storage_read_mib_s:.0f} s on {p.profile.storage})")


# --------------------------------------------------------------------------- enforcement
class MemoryBudgetExceeded(UserError):
    """The process outgrew its memory budget; training stopped at a step boundary."""


def check_fits(cfg: RunConfig, input_shape, num_classes: int, n_train: int | None) -> None:
    """Pre-flight check of `train`: refuse a configuration predicted to exceed its budget
    (runtime baseline plus predicted tensor peak, without the planner's safety factor).

    Does nothing when `cfg.memory_budget` is None.

    Raises:
        UserError: budget below the runtime, or the configuration is predicted not to fit.
    """
    if cfg.memory_budget is None:
        return
    from edgetrain.memory import predict_peak, runtime_baseline_bytes
    baseline = runtime_baseline_bytes()
    check_runtime_fits(cfg.memory_budget, baseline)
    # no SAFETY factor here: `plan` keeps that margin, and the baseline measured in this
    # process differs by a few MiB from the planner's; refuse only a predicted overrun
    need = baseline + predict_peak(cfg, tuple(input_shape), num_classes, n_train).peak_bytes
    if need > cfg.memory_budget:
        raise UserError(f"this configuration is predicted to need {fmt_bytes(need)}, more than "
                        f"the memory budget {fmt_bytes(cfg.memory_budget)}; run `edgetrain plan` "
                        "for one that fits")


class RssWatchdog:
    """Polls the process's resident memory in a background thread.

    The thread only records; `check()`, called by the training loop between optimiser
    steps, raises `MemoryBudgetExceeded`, so the run stops at a step boundary where the
    last checkpoint is intact. With `count_cuda`, CUDA memory reserved by PyTorch is added
    (Jetson: GPU memory is system memory but is not in RSS).
    """

    def __init__(self, budget_bytes: int, interval_s: float = 0.05, count_cuda: bool = False):
        import psutil
        self.budget_bytes, self.interval_s, self.count_cuda = budget_bytes, interval_s, count_cuda
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="edgetrain-rss", daemon=True)
        self.peak_bytes = 0
        self.over_bytes: int | None = None  # the first reading above the budget

    def usage_bytes(self) -> int:
        used = self._proc.memory_info().rss
        if self.count_cuda:
            import torch
            if torch.cuda.is_initialized():
                used += torch.cuda.memory_reserved()
        return used

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._record(self.usage_bytes())
            self._stop.wait(self.interval_s)

    def _record(self, used: int) -> None:
        self.peak_bytes = max(self.peak_bytes, used)
        if used > self.budget_bytes and self.over_bytes is None:
            self.over_bytes = used

    def check(self) -> None:
        """Raise `MemoryBudgetExceeded` if any reading so far exceeded the budget."""
        self._record(self.usage_bytes())
        if self.over_bytes is not None:
            raise MemoryBudgetExceeded(
                f"stopped: resident memory reached {fmt_bytes(self.over_bytes)}, over the "
                f"memory budget of {fmt_bytes(self.budget_bytes)}; the run directory keeps its "
                "last checkpoint (`edgetrain train --resume RUN_DIR` continues it once memory "
                "is freed; `edgetrain plan` finds a configuration that fits)")

    def __enter__(self) -> "RssWatchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def watchdog_for(cfg: RunConfig, device: str = "cpu") -> RssWatchdog | None:
    """The watchdog for a run with a budget (None without one).

    CUDA memory counts against the budget only on a profile whose CPU and GPU share one
    DRAM (`cfg.extra["shared_cpu_gpu_memory"]`, set by `--device-profile`).
    """
    if cfg.memory_budget is None:
        return None
    shared = bool(cfg.extra.get("shared_cpu_gpu_memory", False))
    return RssWatchdog(cfg.memory_budget, count_cuda=shared and str(device).startswith("cuda"))


def apply_budget_options(opts: dict, profile_name: str | None, budget_text: str | None,
                         root: Path | None = None) -> dict:
    """Fold `--device-profile` / `--memory-budget` into RunConfig keyword arguments.

    Raises:
        UserError: both given, an unknown or malformed profile, a malformed size.
    """
    if profile_name and budget_text:
        raise UserError("give --device-profile or --memory-budget, not both")
    opts = dict(opts)
    if budget_text:
        opts["memory_budget"] = parse_size(budget_text)
    elif profile_name:
        prof = load_profile(profile_name, root)
        opts["memory_budget"] = prof.budget_bytes
        opts["extra"] = {**opts.get("extra", {}), "device_profile": prof.name,
                         "shared_cpu_gpu_memory": prof.shared_cpu_gpu_memory}
    return opts


@contextmanager
def budget_guard(run):
    """Watch RSS while `run` trains when its config has a budget; `run.step_check` raises.

    `run` is an `edgetrain.schedule.Run`; its `step_check` is called between optimiser
    steps, so a stop leaves every checkpoint written so far valid.
    """
    wd = watchdog_for(run.cfg, str(run.device))
    if wd is None:
        yield None
        return
    run.step_check = wd.check
    try:
        with wd:
            yield wd
    finally:
        run.step_check = None

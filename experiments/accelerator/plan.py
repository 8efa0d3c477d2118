"""What the accelerator check runs: targets, peak FLOP/s, phase sizes and deadlines."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

#: The repository, the carried pure-Python dependencies and Fashion-MNIST (``--prepare``).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPS_DIR = os.path.join(REPO, ".accel_deps")
DEPS_SITE = os.path.join(DEPS_DIR, "site")
DATA_DIR = os.path.join(REPO, ".accel_data", "fashion-mnist")
SYSTEM_FMNIST = "/usr/share/datasets/fashion-mnist"

#: Step-time ratios to base (upper bounds) and rates (lower bounds) to meet.
TARGETS = {
    "sam": 2.05,
    "sadt_t1": 2.1,
    "sadt_t3": 2.1,
    "sadt_t2": 2.8,
    "wrn28_10_bf16_mfu": 0.40,
    "loop_vs_bare_rate": 0.95,
}

#: Dense peak TFLOP/s per chip: (bfloat16, float32 as XLA runs it by default), first match
#: of the key in ``device_kind`` wins. NVIDIA: tensor-core peaks from the data sheets (SXM
#: parts); float32 is the TF32 tensor-core peak because XLA's default precision lets
#: cuBLAS/cuDNN use TF32 for float32 dots and convolutions (with
#: ``jax_default_matmul_precision=highest`` the H100/H200 float32 peak is ~67). TPU: float32
#: matmuls run as bfloat16 passes at default precision, so the bfloat16 peak is used.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H100 PCIe": (756.0, 378.0),
    "H200": (989.4, 494.7),
    "H100": (989.4, 494.7),
    "GH200": (989.4, 494.7),
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "L4": (121.0, 60.0),
    "RTX 4090": (165.2, 82.6),
    "RTX 3090": (71.0, 35.6),
    "V100": (125.0, 15.7),
    "TPU v6 lite": (918.0, 918.0),
    "TPU v5 lite": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0),
    "TPU v5": (459.0, 459.0),
    "TPU v4": (275.0, 275.0),
}

#: Where each phase must end, as a fraction of the budget (absolute: slack carries over).
PHASE_ENDS = {
    "tests": 0.25,
    "speed_simple_cnn": 0.45,
    "speed_large": 0.70,
    "loop_rate": 0.77,
    "precision": 0.84,
    "comparison": 1.0,
}

SPEED_METHODS = (
    "base",
    "sam",
    "sadt_t1",
    "sadt_t3",
    "sadt_t2",
    "base_2x",
    "sadt_ema",
    "sadt_t1_1u",
    "gc",
    "agc",
)
LARGE_METHODS = ("base", "sadt_t1", "sam", "sadt_t3", "sadt_t2")


@dataclasses.dataclass(frozen=True)
class SpeedCase:
    """One ``benchmark.py`` run: a model at a batch size and dtype, several methods."""

    model: str
    shape: tuple[int, int, int]
    batch: int
    dtype: str
    methods: tuple[str, ...]
    model_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.model} b{self.batch} {self.dtype}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of every phase: :func:`full_plan` on an accelerator, :func:`smoke_plan` on CPU."""

    budget_s: float
    tests_k: str | None
    speed_simple: tuple[SpeedCase, ...]
    speed_large: tuple[SpeedCase, ...]
    bench_steps: int
    bench_warmup: int
    bench_repeats: int
    guess_s_per_method: dict[str, float]
    batch_size: int
    eval_batch_size: int
    loop_epochs: int
    precision_method: str
    precision_epochs: int
    compare_methods: tuple[str, ...]
    compare_seeds: tuple[int, ...]
    compare_epochs: int
    max_train_examples: int | None
    num_validation: int


def full_plan(budget_s: float = 450.0, compare_epochs: int = 30) -> Plan:
    """The check as run on an accelerator."""
    simple = tuple(
        SpeedCase("simple_cnn", (28, 28, 1), b, d, SPEED_METHODS)
        for b, d in ((512, "float32"), (512, "bfloat16"), (2048, "float32"), (2048, "bfloat16"))
    )
    large = tuple(
        SpeedCase(m, (32, 32, 3), b, "bfloat16", LARGE_METHODS if b == 256 else LARGE_METHODS[:2])
        for b in (256, 512)
        for m in ("wrn28_10", "resnet18")
    )
    return Plan(
        budget_s=budget_s,
        tests_k=None,
        speed_simple=simple,
        speed_large=large,
        bench_steps=20,
        bench_warmup=3,
        bench_repeats=3,
        guess_s_per_method={"simple_cnn": 5.0, "resnet18": 15.0, "wrn28_10": 30.0},
        batch_size=512,
        eval_batch_size=1000,
        loop_epochs=3,
        precision_method="sadt_t1",
        precision_epochs=3,
        compare_methods=("base", "base_2x", "sadt_t1"),
        compare_seeds=(0, 1, 2),
        compare_epochs=compare_epochs,
        max_train_examples=None,
        num_validation=3000,
    )


def smoke_plan(budget_s: float = 600.0) -> Plan:
    """The same phases with tiny sizes, one case or run where the full plan has several."""
    simple = (
        SpeedCase("simple_cnn", (8, 8, 1), 8, "float32", ("base", "sadt_t1")),
        SpeedCase("simple_cnn", (8, 8, 1), 8, "bfloat16", ("base",)),
    )
    large = (
        SpeedCase(
            "wrn28_10", (8, 8, 3), 4, "bfloat16", ("base",), (("depth", 10), ("widen_factor", 1))
        ),
    )
    return Plan(
        budget_s=budget_s,
        tests_k="test_cross_entropy_closed_form",
        speed_simple=simple,
        speed_large=large,
        bench_steps=2,
        bench_warmup=1,
        bench_repeats=1,
        guess_s_per_method={"simple_cnn": 3.0, "resnet18": 5.0, "wrn28_10": 5.0},
        batch_size=32,
        eval_batch_size=100,
        loop_epochs=2,
        precision_method="base",
        precision_epochs=1,
        compare_methods=("base", "base_2x"),
        compare_seeds=(0,),
        compare_epochs=1,
        max_train_examples=96,
        num_validation=100,
    )


# ---- time budget ---------------------------------------------------------------------


class Clock:
    """Seconds since the start, and each phase's absolute deadline."""

    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self, phase: str) -> float:
        """Seconds until ``phase``'s deadline."""
        return PHASE_ENDS[phase] * self.budget_s - self.elapsed()


def peak_tflops(device_kind: str, dtype: str) -> tuple[float | None, str]:
    """``(peak TFLOP/s, the table key used)`` for ``dtype`` on ``device_kind``."""
    for key, (bf16, f32) in PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return (bf16 if dtype == "bfloat16" else f32), key
    return None, "unknown device: no MFU"


def slug(device_kind: str) -> str:
    """``'NVIDIA H200'`` -> ``'nvidia_h200'`` (the output folder's name)."""
    return re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_") or "unknown"

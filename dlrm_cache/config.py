"""Typed configuration: plain dataclasses, every default in one place (here).

The commands register them in Hydra's ConfigStore (``dlrm_cache.cli.schemas``), so Hydra checks key
names and types when it composes a config; the values themselves are checked here, in
``__post_init__``, which runs when ``schemas.to_config`` turns the composed ``DictConfig`` into these
dataclasses. This module imports neither Hydra nor OmegaConf: the library (``dlrm_cache.cache``,
``dlrm_cache.distributed``) takes the dataclasses and works without them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

GB = 1 << 30  # what the *_gb settings count in (bandwidths in GB/s are 1e9 bytes a second)
SPARSE_OPTIMIZERS = ("sgd", "adagrad", "adam")  # dlrm_cache.cache.optim's fused optimizers


class ConfigError(ValueError):
    """A configuration value that is of the right type but not allowed."""


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def _require_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, value, "one of " + ", ".join(choices))


@dataclass
class SynthConfig:
    """``dlrm-synth``: write Criteo-format TSV with power-law ids and a learnable label."""

    rows: int = 200_000
    out: str = "data/synth/train.txt"
    seed: int = 0
    zipf: float = 1.05  # exponent s of P(rank k) ~ 1 / (k + 1)^s, per feature
    # kaggle | terabyte (the published per-feature cardinalities of Criteo Kaggle / 1TB), or 26 numbers
    cardinalities: Any = "kaggle"
    cardinality_scale: float = 1.0  # multiplies every cardinality (rounded, at least 1)
    labeled: bool = True  # False: the 39-field unlabeled layout of Kaggle's test.txt
    # kaggle: one file at `out`; terabyte: `out`/day_0 .. day_{days-1}; None: as the cardinalities
    layout: str | None = None
    days: int = 24
    gzip: bool = False
    overwrite: bool = False
    progress: bool = True
    # tsv: the files above; parquet: a dlrm-preprocess dataset in the folder `out`, preprocessed with
    # `preprocess.*` (MLPerf's multi-hot bags: preprocess.multi_hot_sizes) from such files, made beside
    # it and removed (dlrm_cache/data/generated_dataset.py)
    format: str = "tsv"
    preprocess: PreprocessOptions = field(default_factory=lambda: PreprocessOptions())

    def __post_init__(self) -> None:
        _require(self.rows > 0, "rows", self.rows, "a positive number of rows")
        _require_choice("format", self.format, ("tsv", "parquet"))
        if self.format == "tsv":
            defaults = asdict(PreprocessOptions())
            given = next((k for k, v in asdict(self.preprocess).items() if v != defaults[k]), None)
            _require(given is None, f"preprocess.{given}", getattr(self.preprocess, given or "min_count"),
                     "nothing: preprocess.* makes a dataset, with format=parquet")  # fmt: skip
        else:
            _require(not self.gzip, "gzip", self.gzip, "false with format=parquet (a dataset, not text)")
        _require(bool(self.out), "out", self.out, "an output path")
        _require(self.zipf > 0, "zipf", self.zipf, "an exponent > 0")
        _require(self.cardinality_scale > 0, "cardinality_scale", self.cardinality_scale, "a factor > 0")
        if self.cardinalities is None:
            self.cardinalities = "kaggle"
        if isinstance(self.cardinalities, str):
            _require_choice("cardinalities", self.cardinalities, ("kaggle", "terabyte"))
        else:
            self.cardinalities = list(self.cardinalities)
            _require(len(self.cardinalities) == 26, "cardinalities", self.cardinalities, "26 values")
            for i, c in enumerate(self.cardinalities):
                _require(isinstance(c, int) and c >= 1, f"cardinalities[{i}]", c, "a cardinality >= 1")
        if self.layout is None:
            self.layout = "terabyte" if self.cardinalities == "terabyte" else "kaggle"
        _require_choice("layout", self.layout, ("kaggle", "terabyte"))
        _require(self.days >= 1, "days", self.days, "at least 1 day")
        if self.layout == "terabyte":
            _require(
                self.rows >= self.days, "rows", self.rows, f"at least one row per day (days={self.days})"
            )


@dataclass
class DatasetConfig:
    """How a dataset's rows split into train / val / test (``dataset=criteo_kaggle|criteo_1tb``).

    ``split=fraction``: the inputs' lines in order; the first ``train_fraction`` train, the rest halved
    into val then test (the DLRM reference's 7 "days" of Kaggle: 6/7). ``split=last_file``: every input
    but the last is train, the last is halved into val then test (Criteo 1TB: days 0-22, then day 23).
    """

    name: str = "criteo_kaggle"
    split: str = "fraction"
    train_fraction: float = 6 / 7

    def __post_init__(self) -> None:
        _require_choice("dataset.split", self.split, ("fraction", "last_file"))
        _require(
            0 < self.train_fraction < 1, "dataset.train_fraction", self.train_fraction, "a share in (0, 1)"
        )


# MLPerf DLRM-DCNv2's ids per bag of each Criteo feature (214 a sample); the most a bag may hold.
MULTI_HOT_MLPERF = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
MAX_BAG = 1 << 16


@dataclass
class PreprocessOptions:
    """``preprocess.*``: the knobs of ``dlrm-preprocess``."""

    min_count: int = 1  # values seen fewer times in train share the "rare" id
    on_bad_lines: str = "error"  # error | skip (skipped lines are counted in the metadata)
    # native (C++, built on first use), arrow (pyarrow's CSV reader), or auto (native where a C++
    # compiler is found, else arrow with a warning). The same rows and errors either way.
    parser: str = "auto"
    chunk_mb: int = 32  # bytes of TSV parsed at a time: bounds memory
    row_group_rows: int = 131_072
    max_file_rows: int = 4_000_000  # start a new part file after this many rows
    workers: int = 0  # processes parsing input files (one file each), parts written at once; 0: one per core
    progress: bool = True
    # The whole command's memory, GB: past it, counting goes out of core (spilled beside the output).
    # 0: half the machine's RAM.
    memory_gb: float = 0.0
    # The DLRM reference's / MLPerf's hashing: every categorical value becomes int(hex, 16) % this
    # before counting (40000000 gives MLPerf's Criteo 1TB tables); 0: off. The empty value stays apart.
    max_ind_range: int = 0
    # MLPerf DLRM-DCNv2's synthetic multi-hot data (dlrm_cache/data/multi_hot.py): 26 bag sizes, one per
    # feature; every id expands to a fixed bag of its feature's size (the id, then size - 1 ids drawn
    # from `multi_hot_distribution`: uniform | pareto, seeded by `multi_hot_seed`). None: one id a value.
    multi_hot_sizes: Any = None
    multi_hot_distribution: str = "uniform"
    multi_hot_seed: int = 0

    def __post_init__(self) -> None:
        _require(self.min_count >= 1, "preprocess.min_count", self.min_count, ">= 1")
        if self.multi_hot_sizes is not None:
            sizes = self.multi_hot_sizes
            _require(isinstance(sizes, list | tuple) and len(sizes) == len(MULTI_HOT_MLPERF),
                     "preprocess.multi_hot_sizes", sizes, f"{len(MULTI_HOT_MLPERF)} bag sizes, one per "
                     f"feature (MLPerf's: {','.join(map(str, MULTI_HOT_MLPERF))})")  # fmt: skip
            for i, s in enumerate(sizes):
                _require(isinstance(s, int) and 1 <= s <= MAX_BAG, f"preprocess.multi_hot_sizes[{i}]", s,
                         f"a bag size from 1 to {MAX_BAG}")  # fmt: skip
            self.multi_hot_sizes = list(sizes)
        distributions = ("uniform", "pareto")
        _require_choice("preprocess.multi_hot_distribution", self.multi_hot_distribution, distributions)
        _require_choice("preprocess.on_bad_lines", self.on_bad_lines, ("error", "skip"))
        _require_choice("preprocess.parser", self.parser, ("auto", "native", "arrow"))
        _require(self.chunk_mb >= 1, "preprocess.chunk_mb", self.chunk_mb, ">= 1")
        _require(self.row_group_rows >= 1, "preprocess.row_group_rows", self.row_group_rows, ">= 1")
        _require(self.workers >= 0, "preprocess.workers", self.workers, ">= 0 (0: one per core)")
        _require(self.memory_gb >= 0, "preprocess.memory_gb", self.memory_gb, "GB >= 0 (0: half the RAM)")
        _require(self.max_ind_range >= 0, "preprocess.max_ind_range", self.max_ind_range, ">= 0 (0: off)")
        _require(self.max_file_rows >= self.row_group_rows, "preprocess.max_file_rows", self.max_file_rows,
                 f">= preprocess.row_group_rows ({self.row_group_rows})")  # fmt: skip


@dataclass
class PreprocessRunConfig:
    """Everything ``dlrm-preprocess`` reads (the root of ``configs/preprocess.yaml``)."""

    input: Any = None  # a path, a glob, or a list of them
    output_dir: str = ""
    overwrite: bool = False
    # Another dataset's folder: encode with its vocabularies (and its max_ind_range) instead of
    # counting new ones; unseen values and values it dropped get its rare id.
    vocab_from: str | None = None
    all_into: str | None = None  # train | val | test: every input line into this split (no split)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)

    def __post_init__(self) -> None:
        inputs = self.input if isinstance(self.input, list | tuple) else [self.input]
        _require(
            bool(inputs) and all(isinstance(i, str) and i for i in inputs),
            "input", self.input, "a path, a glob or a list of them",
        )  # fmt: skip
        self.input = list(inputs)
        _require(bool(self.output_dir), "output_dir", self.output_dir, "an output folder")
        if self.all_into is not None:
            _require_choice("all_into", self.all_into, ("train", "val", "test"))
            _require(
                self.all_into == "train" or self.vocab_from is not None, "all_into", self.all_into,
                "train, or vocab_from=<a dlrm-preprocess output> beside it: with no train split there is "
                "nothing to fit vocabularies on",
            )  # fmt: skip
        if self.vocab_from is not None:
            _require(bool(self.vocab_from), "vocab_from", self.vocab_from, "a dlrm-preprocess output folder")
            kept = "to be left out with vocab_from (its vocabulary decides which values are kept)"
            _require(self.preprocess.min_count == 1, "preprocess.min_count", self.preprocess.min_count, kept)


CACHE_POLICIES = ("none", "lru", "lfu", "freq", "lookahead")
DENSE_OPTIMIZERS = ("sgd", "adagrad", "adam")
SHARDINGS = ("table_wise", "column_wise", "hybrid")


@dataclass
class CacheConfig:
    """The embedding cache (``cache.*``)."""

    policy: str = "lookahead"
    ratio: float = 0.015  # share of each table's rows kept on the device
    table_ratios: dict[str, float] = field(default_factory=dict)  # per-table override of `ratio`
    full_table_rows: int = 10_000  # tables with at most this many rows live wholly on the device
    lookahead: int = 256  # future batches whose ids the trainer hands the cache (policy=lookahead)
    warmup_ratio: float = 0.7  # share of each cache filled with the hottest rows before step 1
    host: str = "memory"  # memory | mmap (file-backed host tier, for tables larger than RAM)
    mmap_dir: str | None = None  # where host=mmap puts its files (default: a temporary folder)
    # Device memory for the caches, per rank, in GB (rows and their optimizer state): when > 0 the
    # planner sizes each table's cache from it and the tables' frequency statistics instead of `ratio`.
    device_budget_gb: float = 0.0
    # Who plans each step's loads and evictions: native (C++, built on first use), python, or auto
    # (native where a C++ compiler is found, else python with a warning). Same plans either way.
    planner: str = "auto"
    # Where each step is planned: inline (on the training thread, between the step's phases) or on a
    # bookkeeping thread of its own while the step computes; auto: inline on the CPU, thread on CUDA.
    bookkeeping: str = "auto"
    # With a bookkeeping thread: threads that make enqueued batches' ids ready for the cache (global ids,
    # unique rows, bags), each batch on one thread, ahead of the bookkeeping thread that plans them in order.
    prepare_threads: int = 1
    # Who copies rows between host and cache: native (C++ memcpy per row, CPU device and native planner
    # only) or torch (index_select / index_copy_); auto: native where it can, torch elsewhere.
    row_copies: str = "auto"

    def __post_init__(self) -> None:
        _require_choice("cache.policy", self.policy, CACHE_POLICIES)
        _require_choice("cache.planner", self.planner, ("auto", "native", "python"))
        _require_choice("cache.bookkeeping", self.bookkeeping, ("auto", "inline", "thread"))
        _require_choice("cache.row_copies", self.row_copies, ("auto", "native", "torch"))
        _require(
            self.prepare_threads >= 1,
            "cache.prepare_threads",
            self.prepare_threads,
            "a number of threads >= 1",
        )
        _require(self.device_budget_gb >= 0, "cache.device_budget_gb", self.device_budget_gb, ">= 0")
        _require(0 < self.ratio <= 1, "cache.ratio", self.ratio, "a share in (0, 1]")
        for name, r in self.table_ratios.items():
            _require(0 < r <= 1, f"cache.table_ratios.{name}", r, "a share in (0, 1]")
        _require(self.full_table_rows >= 0, "cache.full_table_rows", self.full_table_rows, ">= 0")
        _require(self.lookahead >= 0, "cache.lookahead", self.lookahead, "a number of batches >= 0")
        _require(0 <= self.warmup_ratio <= 1, "cache.warmup_ratio", self.warmup_ratio, "a share in [0, 1]")
        _require_choice("cache.host", self.host, ("memory", "mmap"))

    def bookkeeping_thread(self, device_type: str) -> bool:
        """Whether steps are planned on a bookkeeping thread of their own (``cache.bookkeeping``)."""
        return self.bookkeeping == "thread" or (self.bookkeeping == "auto" and device_type == "cuda")

    def keeps_whole(self, rows: int) -> bool:
        """Whether a table of ``rows`` lives wholly on the device: ``policy=none``, or a small table."""
        return self.policy == "none" or rows <= self.full_table_rows

    def capacity(self, table: str, rows: int) -> int:
        """Cache slots for a table: all its rows when kept whole, else its ratio of them (at least 1)."""
        if self.keeps_whole(rows):
            return rows
        ratio = self.table_ratios.get(table, self.ratio)
        return max(1, min(rows, int(round(ratio * rows))))


@dataclass
class OptimConfig:
    """Optimizers (``optim.*``): the sparse one is fused into the cache, the dense one is torch's."""

    sparse: str = "adagrad"
    dense: str = "adagrad"
    sparse_lr: float = 0.01
    dense_lr: float = 0.01
    eps: float = 1e-8
    beta1: float = 0.9  # adam only
    beta2: float = 0.999  # adam only
    # The DLRM reference's schedule: linear warm-up over `warmup_steps`, then from `decay_start` a
    # polynomial (power 2) decay to 0 over `decay_steps`; 0 turns each part off. Dense and sparse alike.
    warmup_steps: int = 0
    decay_start: int = 0
    decay_steps: int = 0

    def __post_init__(self) -> None:
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        _require(self.decay_start >= 0, "optim.decay_start", self.decay_start, ">= 0")
        _require(self.decay_steps >= 0, "optim.decay_steps", self.decay_steps, ">= 0")
        _require_choice("optim.sparse", self.sparse, SPARSE_OPTIMIZERS)
        _require_choice("optim.dense", self.dense, DENSE_OPTIMIZERS)
        _require(self.sparse_lr > 0, "optim.sparse_lr", self.sparse_lr, "a learning rate > 0")
        _require(self.dense_lr > 0, "optim.dense_lr", self.dense_lr, "a learning rate > 0")
        _require(self.eps > 0, "optim.eps", self.eps, "> 0")
        _require(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "a value in [0, 1)")
        _require(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "a value in [0, 1)")


@dataclass
class DataConfig:
    """Training data (``data.*``): a dataset written by ``dlrm-preprocess``."""

    path: str | None = None  # None: generate and preprocess a small synthetic dataset (below)
    shuffle: bool = False  # shuffle row groups, and rows within each, per epoch (seeded)
    synthetic_dir: str = "data/default"  # where the built-in default dataset is made (once)
    synthetic_rows: int = 200_000
    synthetic_cardinality_scale: float = 0.01
    synthetic_cardinalities: str = "kaggle"  # kaggle | terabyte: the profile the data is generated from
    # preprocess.max_ind_range, multi_hot_sizes and multi_hot_distribution of the default dataset
    synthetic_max_ind_range: int = 0
    synthetic_multi_hot_sizes: Any = None
    synthetic_multi_hot_distribution: str = "uniform"

    def __post_init__(self) -> None:
        _require(self.synthetic_rows >= 1000, "data.synthetic_rows", self.synthetic_rows, ">= 1000")
        _require(self.synthetic_cardinality_scale > 0, "data.synthetic_cardinality_scale",
                 self.synthetic_cardinality_scale, "> 0")  # fmt: skip
        _require_choice("data.synthetic_cardinalities", self.synthetic_cardinalities, ("kaggle", "terabyte"))
        self.synthetic_preprocess()  # checks the preprocessing values

    def synthetic_preprocess(self) -> PreprocessOptions:
        """How the built-in default dataset is preprocessed (``data.synthetic_*``)."""
        try:
            return PreprocessOptions(
                max_ind_range=self.synthetic_max_ind_range,
                multi_hot_sizes=self.synthetic_multi_hot_sizes,
                multi_hot_distribution=self.synthetic_multi_hot_distribution,
            )
        except ConfigError as e:
            raise ConfigError(str(e).replace("preprocess.", "data.synthetic_", 1)) from None


@dataclass
class ModelConfig:
    """The model (``model=dlrm|dcn``): TorchRec's ``DLRM`` or ``DLRM_DCN`` over the cached tables."""

    name: str = "dlrm"
    embedding_dim: int = 16
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [512, 256, 16])
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [512, 256, 1])
    dcn_num_layers: int = 3  # dcn only
    dcn_low_rank_dim: int = 512  # dcn only

    def __post_init__(self) -> None:
        _require_choice("model.name", self.name, ("dlrm", "dcn"))
        _require(self.embedding_dim > 0, "model.embedding_dim", self.embedding_dim, "> 0")
        last = self.dense_arch_layer_sizes[-1] if self.dense_arch_layer_sizes else None
        _require(
            last == self.embedding_dim,
            "model.dense_arch_layer_sizes",
            self.dense_arch_layer_sizes,
            f"a list ending in model.embedding_dim ({self.embedding_dim}), as DLRM's interaction needs",
        )
        _require(
            bool(self.over_arch_layer_sizes) and self.over_arch_layer_sizes[-1] == 1,
            "model.over_arch_layer_sizes",
            self.over_arch_layer_sizes,
            "a list ending in 1 (one logit)",
        )
        _require(self.dcn_num_layers >= 1, "model.dcn_num_layers", self.dcn_num_layers, ">= 1")
        _require(self.dcn_low_rank_dim >= 1, "model.dcn_low_rank_dim", self.dcn_low_rank_dim, ">= 1")


@dataclass
class NetworkConfig:
    """Bandwidths per rank, GB/s (1e9 bytes), for the hybrid split's cost model (``trainer.network.*``).
    Defaults: one NVLink node, HugeCTR's documented figures (all-to-all 190, all-reduce 130) and PCIe
    Gen5 x16 between host and device; between InfiniBand nodes (HDR, 200 Gb/s a GPU) use 25 and 25."""

    all_to_all_gb_per_s: float = 190.0
    all_reduce_gb_per_s: float = 130.0
    host_to_device_gb_per_s: float = 50.0

    def __post_init__(self) -> None:
        for key in ("all_to_all_gb_per_s", "all_reduce_gb_per_s", "host_to_device_gb_per_s"):
            _require(getattr(self, key) > 0, f"trainer.network.{key}", getattr(self, key), "GB/s > 0")


@dataclass
class TrainerConfig:
    """Where training runs (``trainer=cpu|gpu``)."""

    device: str = "cpu"
    # Several processes (torchrun), or sharded=true: tables placed on ranks by the planner, whole
    # (table_wise) or, for tables above cache.full_table_rows, split by columns over all ranks
    # (column_wise); or hybrid: each table's hottest rows replicated on every rank, the rest table-wise.
    sharding: str = "table_wise"
    sharded: bool = False  # use the sharded path (TorchRec DistributedModelParallel) at world size 1 too
    collective_timeout_min: float = 10.0  # a collective waiting longer fails (a rank died) instead of hanging
    # hybrid: replicated rows per table, instead of the cost model's choice (table name -> rows)
    hot_rows: dict[str, int] = field(default_factory=dict)
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def __post_init__(self) -> None:
        _require_choice("trainer.device", self.device, ("cpu", "cuda"))
        timeout = self.collective_timeout_min
        _require(timeout > 0, "trainer.collective_timeout_min", timeout, "minutes > 0")
        _require_choice("trainer.sharding", self.sharding, SHARDINGS)
        for name, rows in self.hot_rows.items():
            _require(rows >= 0, f"trainer.hot_rows.{name}", rows, "rows >= 0")


@dataclass
class TrainLoopConfig:
    """The training loop (``train.*``)."""

    epochs: int = 1
    max_steps: int = 0  # 0: no limit beyond `epochs`
    batch_size: int = 2048  # global, over all ranks
    log_every: int = 50
    eval_every: int = 0  # steps; 0: evaluate only at the end (or as evals_per_epoch says)
    evals_per_epoch: int = 0  # evaluate this many times an epoch, evenly (MLPerf: 20); 0: by eval_every
    checkpoint_every: int = 0  # 0: checkpoint only at the end
    resume: bool = False
    tensorboard: bool = True  # event files of every logged figure under <run dir>/tensorboard

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", self.epochs, ">= 1")
        _require(self.max_steps >= 0, "train.max_steps", self.max_steps, ">= 0")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, ">= 1")
        _require(self.log_every >= 1, "train.log_every", self.log_every, ">= 1")
        _require(self.eval_every >= 0, "train.eval_every", self.eval_every, ">= 0")
        _require(self.evals_per_epoch >= 0, "train.evals_per_epoch", self.evals_per_epoch, ">= 0")
        both = bool(self.eval_every and self.evals_per_epoch)
        _require(not both, "train.evals_per_epoch", self.evals_per_epoch,
                 f"0 beside train.eval_every={self.eval_every} (one of the two says when)")  # fmt: skip
        _require(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, ">= 0")


@dataclass
class TrainRunConfig:
    """Everything ``dlrm-train`` reads (the root of ``configs/train.yaml``)."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)


@dataclass
class PredictConfig:
    """Everything ``dlrm-predict`` reads (the root of ``configs/predict.yaml``)."""

    run_dir: str = ""  # a dlrm-train run (its checkpoint/)
    # raw Criteo TSV (plain or .gz: a path, a glob or a list), or one dlrm-preprocess output folder
    input: Any = None
    output: str = ""  # the CSV file written
    split: str = "test"  # the split scored when the input is a preprocessed folder
    data_path: str | None = None  # the dataset whose vocabulary encodes raw input (default: the run's)
    batch_size: int = 0  # 0: the run's train.batch_size
    device: str = "cpu"
    # kaggle: "Id,Predicted", ids counted from first_id (Kaggle's test.txt starts at 60000000); plain:
    # "probability" (and "label" when the input has labels); auto: kaggle for one unlabelled file
    # named test.txt(.gz), plain otherwise
    format: str = "auto"
    first_id: int = 60_000_000
    # memory: the tables whole in RAM, as plain TorchRec modules; mmap: through the run's cache, the
    # tables (as trained, with their optimizer state) in files under mmap_dir: for tables beyond RAM
    host: str = "memory"
    mmap_dir: str | None = None  # host=mmap: where the files go (default: a temporary folder)
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        _require(bool(self.run_dir), "run_dir", self.run_dir, "a dlrm-train run folder")
        inputs = self.input if isinstance(self.input, list | tuple) else [self.input]
        _require(bool(inputs) and all(isinstance(i, str) and i for i in inputs), "input", self.input,
                 "a TSV path, a glob or a list of them, or a dlrm-preprocess output folder")  # fmt: skip
        self.input = list(inputs)
        _require(bool(self.output), "output", self.output, "a CSV file to write")
        _require_choice("split", self.split, ("train", "val", "test"))
        _require(self.batch_size >= 0, "batch_size", self.batch_size, ">= 0 (0: the run's train.batch_size)")
        _require_choice("device", self.device, ("cpu", "cuda"))
        _require_choice("format", self.format, ("auto", "kaggle", "plain"))
        _require_choice("host", self.host, ("memory", "mmap"))


@dataclass
class ExportConfig:
    """Everything ``dlrm-export`` reads (the root of ``configs/export.yaml``)."""

    run_dir: str = ""  # a dlrm-train run (its checkpoint/)
    output: str = ""  # the folder written: model.json and model.pt
    overwrite: bool = False

    def __post_init__(self) -> None:
        _require(bool(self.run_dir), "run_dir", self.run_dir, "a dlrm-train run folder")
        _require(bool(self.output), "output", self.output, "a folder to write model.json and model.pt into")

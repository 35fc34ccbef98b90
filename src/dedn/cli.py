"""The ``dedn`` command: a thin layer over the library API (every command is a few calls into it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dedn import __version__
from dedn.errors import DataError, DednError

app = typer.Typer(
    name="dedn",
    help="DEDN (Dual Expert Distillation Network) for generalized zero-shot learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Markdown: a docstring's paragraphs stay paragraphs and rewrap to the terminal's width as a whole.
    rich_markup_mode="markdown",
)
store_app = typer.Typer(help="Feature stores: import and export DAZLE/DEDN HDF5 files, inspect.", no_args_is_help=True,
                        rich_markup_mode="markdown")
app.add_typer(store_app, name="store")

PRECISION_HELP = "fp32 or bf16: precision of the feature products (default: the run's train.precision)"


def _help_requested() -> bool:
    return "--help" in sys.argv[1:]


# The help of some options names the registered choices. Typer reads the annotations when the command line is
# parsed; the registries are imported only for --help (the backbones' and methods' modules load torch: seconds).
def _listed(registry: str) -> str:
    """The names in a registry (``module.NAME``: a mapping, a sequence or a function returning one), for --help."""
    if not _help_requested():
        return "see --help"
    import importlib

    module, name = registry.rsplit(".", 1)
    names = getattr(importlib.import_module(module), name)
    return ", ".join(names() if callable(names) else names)


BACKBONE_REGISTRY = "dedn.features.backbones.BACKBONES"
CONFIG_REGISTRY = "dedn.config.packaged_configs"
METHOD_REGISTRY = "dedn.models.registry.model_names"
EXPERIMENT_REGISTRY = "dedn.apps.experiments.EXPERIMENTS"

Overrides = Annotated[Optional[list[str]], typer.Argument(help="dotted.key=value config overrides")]  # noqa: UP045


def _hide_flag_types() -> None:
    """No ``<bool>`` type column for on/off flags (``--json``, ``--naive/--no-naive``, ``--help``): they take no value.

    Recent typer versions (its own vendored click) print the flag's Python type there; older ones print nothing.
    """
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - typer without its own option class
        return
    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "dedn_hides_flags", False):
        return

    def display_type_rich(self, ctx):  # noqa: ANN001, ANN202
        if getattr(self, "is_bool_flag", False) and self.metavar is None:
            return None
        return shown(self, ctx)

    display_type_rich.dedn_hides_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich


_hide_flag_types()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dedn {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """DEDN for generalized zero-shot learning: train, evaluate, reproduce the paper, predict, explain."""


def _print_metrics(metrics: dict, title: str, validated: dict | None = None) -> None:
    """T U S H and AUSUC in percent, with the calibration gamma and where it came from. A figure at a fixed gamma
    gets the one at the run's validated gamma (``validated``) on the next row, or a line on how to get one."""
    from dedn.eval.calibration import fixed_gamma_note
    from dedn.eval.metrics import METRIC_ORDER

    keys = [k for k in METRIC_ORDER if metrics.get(k) is not None]
    typer.echo(title)
    typer.echo("  " + "  ".join(f"{k:>6}" for k in keys))

    def row(m: dict) -> str:
        gamma = m.get("gamma")
        where = f"gamma = {gamma:.4g} ({m.get('gamma_source', 'source unknown')})" if gamma is not None else ""
        cells = (f"{m[k]:6.2f}" if m.get(k) is not None else f"{'':6}" for k in keys)
        return "  " + "  ".join(cells) + f"   (%, {where})"

    typer.echo(row(metrics))
    note = fixed_gamma_note(metrics.get("gamma_source"))
    if validated is not None:
        typer.echo(row(validated) + "  <- the same outputs at the run's validated gamma")
    elif note:
        typer.echo(f"  {note}")
    if metrics.get("oracle_H") is not None:
        typer.echo(f"  diagnosis only: H = {metrics['oracle_H']:.2f} at the oracle gamma = "
                   f"{metrics['oracle_gamma']:.4g} chosen on these test scores (not a result)")


# ---------------------------------------------------------------------------------------------- train / eval
@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help=f"a YAML config file, or a packaged config by name: {_listed(CONFIG_REGISTRY)}")] = None,  # noqa: UP045,E501
    overrides: Overrides = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="run directory (default: OUTPUT_DIR/NAME-TIME)")] = None,  # noqa: UP045
    resume: Annotated[Optional[Path], typer.Option(help="continue the run in this directory")] = None,  # noqa: UP045
) -> None:
    """Train DEDN under eval.protocol (validated, published or fixed); writes a run directory."""
    from dedn.apps.protocols import load_protocol_config
    from dedn.apps.protocols import train as train_run
    from dedn.config import find_config, load_config
    from dedn.models.registry import model_entry

    if resume is not None:
        if config is not None or overrides:
            raise DednError(f"{resume}: a resumed run keeps its own config; drop --config and the overrides")
        cfg = load_protocol_config(resume)
        result = train_run(cfg, run_dir=resume, resume=True)
    else:
        cfg = load_config(find_config(config) if config else None, overrides or [])
        result = train_run(cfg, run_dir=run_dir)
    c = result.choices
    how = {"validated": f"epochs ({c.get('epochs')}) and gamma chosen on the validation task, retrained on "
                        "trainval, tested once",
           "published": "best test-split H over training at a fixed gamma (optimistic; for comparison with "
                        "published numbers)",
           "fixed": f"trained {c.get('epochs')} epochs, evaluated once at a fixed gamma"}[result.protocol]
    split = "test split" if cfg.data.split == "test" else "validation task"
    shown = {**result.metrics.to_dict(), **{k: c[k] for k in ("oracle_H", "oracle_gamma") if k in c}}
    label = model_entry(cfg.model.name).label
    _print_metrics(shown, f"{label} ({cfg.mode} mode), {result.protocol} protocol, {split}: {how}")
    typer.echo(f"model: {result.model_dir}")


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "--run", help="run directory of a trained model")],
    calibration: Annotated[str, typer.Option(help="gamma: auto or a number (auto: the run's own gamma, validated "
                                                   "where it has one, else the mode default)")] = "auto",
    l_rc: Annotated[Optional[float], typer.Option(help="region/channel mix (default: the run's)")] = None,  # noqa: UP045
    l_e: Annotated[Optional[float], typer.Option(help="cExp/fExp mix (default: the run's)")] = None,  # noqa: UP045
    out: Annotated[Optional[Path], typer.Option(help="output folder (default: RUN/eval)")] = None,  # noqa: UP045
    precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP)] = None,  # noqa: UP045
    overrides: Overrides = None,
) -> None:
    """Evaluate a trained run on its test split: T, U, S, H, AUSUC, per-class accuracy, seen-unseen curve."""
    from dedn.checks import FRACTION, GammaChoice, check_option, choice, parse_calibration
    from dedn.config import apply_overrides
    from dedn.devices import PRECISIONS, resolve_device
    from dedn.eval.calibration import Calibration, GammaSource
    from dedn.eval.evaluate import evaluate_model, evaluate_outputs, write_evaluation
    from dedn.factory import load_data
    from dedn.models.precision import run_precision
    from dedn.models.registry import entry_for
    from dedn.runfolder import RunFolder
    from dedn.training.checkpoint import load_weights
    from dedn.training.rundir import load_run_config, recorded_calibration

    check_option("--l-rc", l_rc, FRACTION)
    check_option("--l-e", l_e, FRACTION)
    check_option("--precision", precision, choice(*PRECISIONS))
    run = RunFolder(checkpoint).model_folder()
    folder_in = run.path
    setting = parse_calibration(calibration, "--calibration")
    if setting is GammaChoice.VALIDATED:
        raise DednError("--calibration validated: give auto (the run's recorded gamma) or a number")
    fixed = None if setting is GammaChoice.AUTO else Calibration(setting, GammaSource.CONFIG)
    cfg = apply_overrides(load_run_config(folder_in), overrides or [], str(run.config))
    folder = out or folder_in / "eval"
    if folder.resolve() == folder_in.resolve():
        raise DednError(f"--out {out}: that is the run folder itself, whose {RunFolder.METRICS} would be overwritten; "
                        "choose another folder")
    weights = run.weights()
    device = resolve_device(cfg.train.device)
    model = load_weights(weights, device=device)
    key = "--precision" if precision else "train.precision"
    precision = entry_for(model).check_precision(run_precision(precision or cfg.train.precision, cfg.train.dtype,
                                                               key), key)
    data = load_data(cfg)
    recorded = recorded_calibration(folder_in, cfg, data)
    gamma = fixed if fixed is not None else recorded
    ev = evaluate_model(model, data, gamma, cfg.eval.batch_size, device, progress=True, l_rc=l_rc, l_e=l_e,
                        precision=precision)
    metrics = write_evaluation(ev, folder, data.class_names, {
        "mode": cfg.mode, "split": cfg.data.split, "l_rc": l_rc if l_rc is not None else model.config.l_rc,
        "l_e": l_e if l_e is not None else model.config.l_e, "gamma_source": ev.gamma_source,
        "checkpoint": str(weights), "precision": precision, "version": __version__}, label=entry_for(model).label)
    metrics.update({k: v for k, v in ev.summary().items() if k.startswith("oracle_")})
    beside = None  # a fixed gamma's figure, with the run's validated one beside it (no second model pass)
    if fixed is not None and recorded.source == GammaSource.VALIDATED:
        beside = evaluate_outputs(ev.seen, ev.unseen, ev.seen_mask, recorded, metrics["l_rc"], metrics["l_e"]).summary()
    _print_metrics(metrics, f"{entry_for(model).label} ({cfg.mode} mode), {cfg.data.split} split, run {folder_in}; "
                            f"written to {folder}", beside)


# ---------------------------------------------------------------------------------------------- bench
@app.command()
def bench(
    preset: Annotated[str, typer.Option(help="cub, sun or awa2: the real shapes")] = "cub",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    repeats: Annotated[int, typer.Option(help="timed steps per implementation")] = 3,
    naive: Annotated[bool, typer.Option("--naive/--no-naive", help="also time the naive implementation")] = True,
    precision: Annotated[str, typer.Option(help="fp32, bf16 (also times fp32 in the same run) or tf32 (CUDA; "
                                                "on a CPU the same as fp32)")] = "fp32",
    store: Annotated[Optional[Path], typer.Option(help="instead: train from a preset-sized float16 store built at PATH and report peak memory")] = None,  # noqa: UP045,E501
    iters: Annotated[int, typer.Option(help="with --store: training iterations")] = 300,
    in_memory: Annotated[bool, typer.Option("--in-memory/--no-in-memory",
                                            help="with --store: also time the same run from RAM")] = True,
    profile: Annotated[bool, typer.Option("--profile", help="also break one step down by operator class (matrix "
                                                            "products, conversions, elementwise, reductions, "
                                                            "optimizer, other), with the bytes converted")] = False,
) -> None:
    """Time a full training step of the fast model against the naive implementation (or, with --store,
    training from a feature store on disk in bounded memory)."""
    if store is not None:
        from dedn.apps.storebench import StoreBenchSettings, store_bench_command

        store_bench_command(store, StoreBenchSettings(preset=preset, iters=iters, in_memory=in_memory),
                            json_out=as_json)
        return
    from dedn.apps.bench import BENCH_PRECISIONS, BenchSettings, bench_command
    from dedn.checks import check_option, choice

    check_option("--precision", precision, choice(*BENCH_PRECISIONS))
    bench_command(preset, BenchSettings(repeats=repeats, naive=naive, precision=precision, profile=profile),
                  json_out=as_json)


# ---------------------------------------------------------------------------------------------- features
@app.command()
def extract(
    out: Annotated[Path, typer.Option("--out", help="feature store folder to write (resumed if it exists)")],
    images: Annotated[Path, typer.Option(help="the images: an xlsa17 dataset root (with --xlsa17), a folder with one sub-folder per class, or (with --attributes) a CSV with the columns path,class[,split]")],  # noqa: E501
    xlsa17: Annotated[Optional[Path], typer.Option(help="xlsa17 folder of the dataset (att_splits.mat, res101.mat)")] = None,  # noqa: UP045,E501
    dataset: Annotated[Optional[str], typer.Option(help="CUB, SUN or AWA2 (with --xlsa17)")] = None,  # noqa: UP045
    backbone: Annotated[str, typer.Option(help=f"one of: {_listed(BACKBONE_REGISTRY)}, or timm:<model name> (e.g. timm:vit_base_patch16_224; docs/backbones.md)")] = "resnet101",  # noqa: E501
    weights: Annotated[str, typer.Option(help="'imagenet' (download; not for timm:) or a local weights file (.safetensors or a torch state dict)")] = "imagenet",  # noqa: E501
    layer: Annotated[Optional[int], typer.Option(help="timm: only: the block whose output to take (timm's feature points: a ViT's blocks, a CNN's stages; -1 the last, raw); default: the final features, after the final norm")] = None,  # noqa: UP045,E501
    image_size: Annotated[Optional[int], typer.Option(help="input size (CUB/SUN 448, AWA2 224)")] = None,  # noqa: UP045
    batch_size: Annotated[int, typer.Option()] = 32,
    workers: Annotated[int, typer.Option(help="DataLoader workers")] = 2,
    device: Annotated[str, typer.Option()] = "auto",
    dtype: Annotated[str, typer.Option(help="float16 or float32")] = "float16",
    overwrite: Annotated[bool, typer.Option("--overwrite/--no-overwrite", help="replace an existing store")] = False,
    attributes: Annotated[Optional[Path], typer.Option(help="your own dataset: a CSV with the class names in its first column and the attribute names in its header, one row per class")] = None,  # noqa: UP045,E501
    splits: Annotated[Optional[Path], typer.Option(help="with --attributes: a CSV class,split, split train, val or test as xlsa17 names them (train and val: seen classes; val: the validation classes; test: unseen)")] = None,  # noqa: UP045,E501
    groups: Annotated[Optional[Path], typer.Option(help="with --attributes: attribute groups for the clusters, a CSV attribute,group (or a YAML / JSON cluster file); without it train with model.clusters=kmeans or none")] = None,  # noqa: UP045,E501
    test_fraction: Annotated[float, typer.Option(help="with --attributes: share of each seen class's images kept as test images, where the image CSV gives no split")] = 0.2,  # noqa: E501
    seed: Annotated[int, typer.Option(help="with --attributes: the seed of that split")] = 0,
    word_vectors: Annotated[Optional[Path], typer.Option(help="with --attributes: the attributes' semantic vectors (.npy, .npz, .txt or .pkl, one row per attribute); default one-hot")] = None,  # noqa: UP045,E501
) -> None:
    """Extract frozen-backbone region feature maps into a feature store (resumable; torchrun to shard).

    Three kinds of input: an xlsa17 benchmark (--xlsa17); your own dataset (--images, --attributes, --splits),
    whose store carries its classes, attributes, splits and validation classes, so `dedn train data.path=OUT`
    trains on it; or plain class folders (no semantic side: prediction features only).

    Your own dataset is checked whole before the backbone is built: the files name the same classes, every
    class has images, attributes are numbers that vary across classes, names are unique, there is an unseen
    (test) and a validation (val) class, and every image decodes (unreadable images are refused, all listed).
    """
    from dedn.checks import COUNT, DEVICE, IMAGE_SIZE, NON_NEGATIVE_COUNT, OPEN_FRACTION, check_option, choice
    from dedn.data.store import DTYPES, SemanticSide

    # Before the backbone is built (and its weights downloaded).
    # timm models check their own patch size (14, 16, ...) when built; the registered ones have stride 32.
    check_option("--image-size", image_size, COUNT if backbone.startswith("timm:") else IMAGE_SIZE)
    check_option("--batch-size", batch_size, COUNT)
    check_option("--workers", workers, NON_NEGATIVE_COUNT)
    check_option("--device", device, DEVICE)
    check_option("--dtype", dtype, choice(*DTYPES))
    check_option("--test-fraction", test_fraction, OPEN_FRACTION)
    check_option("--seed", seed, NON_NEGATIVE_COUNT)
    for option, path in (("--images", images), ("--xlsa17", xlsa17)):
        if path is not None and not path.exists():
            raise DataError(f"{option} {path}: no such folder or file")
    custom = None
    if attributes is not None or splits is not None:  # checked whole before the backbone is built
        from dedn.apps.custom_dataset import CustomInputs, read_custom_dataset

        if attributes is None or splits is None or xlsa17 is not None:
            raise DednError("your own dataset needs both --attributes ATT.csv and --splits SPLITS.csv (and no "
                            "--xlsa17)")
        custom = read_custom_dataset(CustomInputs(images, attributes, splits, groups, word_vectors, test_fraction,
                                                  seed), name=out.name, num_workers=workers)
    elif groups is not None or word_vectors is not None:
        raise DednError("--groups and --word-vectors describe your own dataset: give them with --attributes "
                        "and --splits")

    sem = name = paths = None
    if xlsa17 is not None:  # read and the images found before the backbone is built (and its weights downloaded)
        from dedn.data.xlsa17 import canonical_dataset, read_semantic_dir, resolve_image_paths

        sem = read_semantic_dir(xlsa17, dataset=dataset)
        if sem.image_files is None or sem.labels is None:
            raise DednError(f"{xlsa17}: no image list (res101.mat) found; it is part of the xlsa17 download")
        name = canonical_dataset(dataset or sem.name) or sem.name
        paths = resolve_image_paths(sem.image_files, images, name)

    from dedn.features.backbones import get_backbone
    from dedn.features.extract import ExtractOptions, extract_features, extract_folder

    bb = get_backbone(backbone, weights=weights, layer=layer)
    common = dict(batch_size=batch_size, num_workers=workers, device=device, dtype=dtype, overwrite=overwrite)
    if custom is not None:
        store = extract_features(custom.paths, custom.labels, out, bb, ExtractOptions(
            image_size=image_size, check_images=False, provenance_extra={"dataset": out.name}, **common))
        store.save_semantics(custom.side)
        if custom.side.clusters is None:
            typer.echo("no attribute groups (--groups): train with model.clusters=kmeans model.n_clusters=Q, "
                       "or model.clusters=none")
    elif xlsa17 is None:
        store = extract_folder(images, out, bb, ExtractOptions(image_size=image_size, **common))
    else:
        from dedn.data.benchmarks import BENCHMARKS, find_benchmark

        # ResNet-101: the benchmark's size (other datasets: CUB's); timm models: their data config's size.
        size = image_size or (bb.default_image_size if backbone.startswith("timm:")
                              else (find_benchmark(name) or BENCHMARKS["CUB"]).image_size)
        store = extract_features(paths, sem.labels, out, bb,
                                 ExtractOptions(image_size=size, provenance_extra={"dataset": name}, **common))
        store.save_semantics(SemanticSide(
            att=sem.att, w2v=sem.w2v, trainval_loc=sem.trainval_loc, test_seen_loc=sem.test_seen_loc,
            test_unseen_loc=sem.test_unseen_loc, class_names=list(sem.class_names),
            attribute_names=list(sem.attribute_names), original_att=sem.original_att, val_classes=sem.val_classes,
            image_files=list(sem.image_files), name=name))
    typer.echo(f"feature store {out}: {len(store)} images, shape {tuple(store.shape[1:])}")


@store_app.command("import")
def store_import(
    h5: Annotated[Path, typer.Argument(help="DAZLE/DEDN-layout HDF5 file")],
    out: Annotated[Path, typer.Argument(help="feature store folder to write (resumed if it exists)")],
    dtype: Annotated[str, typer.Option(help="float16 or float32")] = "float16",
    name: Annotated[Optional[str], typer.Option(help="dataset name (CUB, SUN, AWA2)")] = None,  # noqa: UP045
    overwrite: Annotated[bool, typer.Option("--overwrite/--no-overwrite",
                                            help="replace an existing store imported from another file")] = False,
) -> None:
    """Import an HDF5 feature file into a float16 store, in bounded memory (resumes from the same file only)."""
    from dedn.data.hdf5 import ImportOptions, import_hdf5

    store = import_hdf5(h5, out, ImportOptions(dtype=dtype, name=name, overwrite=overwrite), report=typer.echo)
    typer.echo(f"feature store {out}: {len(store)} images, shape {tuple(store.shape[1:])}")


@store_app.command("export")
def store_export(
    store: Annotated[Path, typer.Argument(help="feature store folder")],
    h5: Annotated[Path, typer.Argument(help="HDF5 file to write")],
    overwrite: Annotated[bool, typer.Option("--overwrite/--no-overwrite",
                                            help="replace an existing HDF5 file (never the store's source)")] = False,
) -> None:
    """Export a store back to the DAZLE/DEDN HDF5 layout."""
    from dedn.data.hdf5 import export_hdf5

    typer.echo(f"wrote {export_hdf5(store, h5, overwrite=overwrite)}")


@store_app.command("info")
def store_info(
    store: Annotated[Path, typer.Argument(help="feature store folder")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")] = False,
) -> None:
    """Print a store's shape, completeness, source identity and provenance."""
    from dedn.data.store import FeatureStore

    s = FeatureStore.open(store)
    prov = s.provenance
    source = {k.removeprefix("source_"): prov[k] for k in ("source_file", "source_bytes", "source_mtime_ns",
                                                          "source_dtype", "source_fingerprint") if k in prov}
    header = "checked"  # FeatureStore.open refuses a store whose header hash is absent or does not match
    info = {"path": str(s.path), "shape": list(s.shape), "dtype": str(s.dtype),
            "complete": s.complete, "chunks": s.n_chunks, "chunks_complete": len(s.completed_chunks),
            "header_hash": header, "source": source or None, "provenance": prov}
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    n, *rest = info["shape"]
    state = "complete" if info["complete"] else "incomplete (resume the import or extraction)"
    lines = [f"feature store {info['path']}",
             f"  images:      {n}, each {' x '.join(map(str, rest))} ({info['dtype']})",
             f"  state:       {state}; {info['chunks_complete']} of {info['chunks']} chunks written",
             f"  header hash: {header}"]
    if source:
        lines.append(f"  source:      {source.get('file', '?')} ({source.get('bytes', '?')} bytes, "
                     f"{source.get('dtype', '?')})")
    other = {k: v for k, v in prov.items() if not k.startswith("source_")}
    if other:
        lines.append("  provenance:")
        lines += [f"    {k}: {v}" for k, v in other.items()]
    lines.append("(--json prints all of it as JSON)")
    typer.echo("\n".join(lines))


@store_app.command("verify")
def store_verify(store: Annotated[Path, typer.Argument(help="feature store folder")]) -> None:
    """Re-read every chunk and compare it with the checksum recorded when it was written."""
    from dedn.data.store import FeatureStore

    typer.echo(FeatureStore.open(store).verify().summary())


# ---------------------------------------------------------------------------------------------- demo / experiments
@app.command()
def demo(
    overrides: Overrides = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help=f"a YAML config file, or a packaged config by name: {_listed(CONFIG_REGISTRY)} (default: demo)")] = None,  # noqa: UP045,E501
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/demo"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress: print only the final table")] = False,
) -> None:
    """The built-in benchmark end to end: features, DEDN and ablations, baseline, curve, heatmaps."""
    from dedn.apps.demo import format_demo, run_demo

    typer.echo(format_demo(run_demo(config, overrides or [], out, progress=not quiet)))


@app.command()
def experiment(
    name: Annotated[str, typer.Argument(help=f"one of: {_listed(EXPERIMENT_REGISTRY)}")],
    overrides: Overrides = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help=f"a YAML config file, or a packaged config by name: {_listed(CONFIG_REGISTRY)}")] = None,  # noqa: UP045,E501
    seeds: Annotated[int, typer.Option(help="seeds (base seed + i)")] = 1,
    protocol: Annotated[Optional[str], typer.Option(help="validated, published (the released code's: best test H at a fixed gamma) or both (default: the config's eval.protocol, validated unless it says otherwise)")] = None,  # noqa: UP045,E501
    out: Annotated[Optional[Path], typer.Option(help="results folder (resumable)")] = None,  # noqa: UP045
    devices: Annotated[Optional[str], typer.Option(help="pool launcher: run independent jobs on these devices, one worker each, e.g. cuda:0,cuda:1")] = None,  # noqa: UP045,E501
    tune: Annotated[Optional[list[str]], typer.Option(help="validated protocol: key=v1,v2 to choose on validation")] = None,  # noqa: UP045,E501
    methods: Annotated[Optional[str], typer.Option(help=f"table1: the methods compared, comma-separated (default: all registered: {_listed(METHOD_REGISTRY)})")] = None,  # noqa: UP045,E501
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress lines, only the report")] = False,
    launcher: Annotated[str, typer.Option(help="pool: in this process, or one worker per --devices entry; local: each job a submitit subprocess; slurm: each job a SLURM job (logs in OUT/submitit)")] = "pool",  # noqa: E501
    partition: Annotated[Optional[str], typer.Option(help="slurm: partition (default: the cluster's)")] = None,  # noqa: UP045
    gpus_per_job: Annotated[Optional[int], typer.Option(help="local, slurm: GPUs per job (default 1; 0: none)")] = None,  # noqa: UP045
    cpus_per_job: Annotated[Optional[int], typer.Option(help="slurm: CPUs per job (default: the cluster's)")] = None,  # noqa: UP045
    mem_gb: Annotated[Optional[int], typer.Option(help="slurm: memory per job, GB (default: the cluster's)")] = None,  # noqa: UP045
    time_min: Annotated[Optional[int], typer.Option(help="local, slurm: time limit per job, minutes; a SLURM job that reaches it is requeued and resumes (default 240)")] = None,  # noqa: UP045,E501
    max_running: Annotated[Optional[int], typer.Option(help="local, slurm: most jobs running at once (default: local 1, slurm no limit)")] = None,  # noqa: UP045,E501
) -> None:
    """Reproduce a paper table or figure; writes Markdown, CSV, JSON and PNG reports.

    Rerunning the same command in the same --out folder skips finished jobs and resumes the others from
    their last checkpoint, whichever launcher ran them before.
    """
    from dedn.apps.experiments import parse_grid, run_experiment
    from dedn.apps.launch import Launch
    from dedn.config import find_config

    launch = Launch(launcher, partition, gpus_per_job, cpus_per_job, mem_gb, time_min, max_running)
    chosen = {"methods": [m.strip() for m in methods.split(",") if m.strip()]} if methods else {}
    if chosen and name != "table1":
        raise DednError("--methods compares methods in table1 only")
    exp = run_experiment(name, find_config(config) if config else None, seeds, protocol, out, overrides or [],
                         devices=devices, tune=parse_grid(tune) if tune else None, **chosen,
                         report=None if quiet else (lambda line: typer.echo(line, err=True)), launch=launch)
    md = [f for f in exp.files if str(f).endswith(".md")]
    if md:
        typer.echo(Path(md[0]).read_text())
    typer.echo(f"reports in {exp.out_dir}")


# ---------------------------------------------------------------------------------------------- samples / describe
@app.command()
def samples(
    out: Annotated[Path, typer.Option("--out", help="folder for the PNGs and index.csv")],
    per_class: Annotated[int, typer.Option(help="images per class")] = 2,
    classes: Annotated[Optional[list[str]], typer.Option(help="only these classes (repeatable or comma-separated): names, numbers 1..K, or seen, unseen, validation")] = None,  # noqa: UP045,E501
    split: Annotated[str, typer.Option(help="which images: test (the test split), train (the trainval images), validation (the validation classes' trainval images) or all (both splits, in turn)")] = "test",  # noqa: E501
    overrides: Overrides = None,
) -> None:
    """Write sample images of the built-in benchmark (the demo's), true class in each file name, with an
    index.csv (path, class, kind: seen, unseen or validation; split: trainval or test). Renders only: no
    backbone, seconds.

    It also writes attributes.csv, splits.csv and groups.csv for the classes shown, so the folder is a dataset of
    your own for `dedn extract --images OUT/index.csv --attributes OUT/attributes.csv --splits OUT/splits.csv`."""
    from dedn.apps.samples import SPLITS, write_samples
    from dedn.checks import COUNT, check_option, check_output_folder, choice

    check_option("--per-class", per_class, COUNT)
    check_option("--split", split, choice(*SPLITS))
    check_output_folder("--out", out)
    result = write_samples(out, per_class, classes, overrides or [], split=split)
    n_classes = len({r[1] for r in result.rows})
    typer.echo(f"wrote {len(result.rows)} images of {n_classes} classes to {result.folder}; index: {result.index}")


@app.command()
def describe(
    run: Annotated[Path, typer.Option("--run", help="run directory of a trained model (any protocol)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    new_classes_template: Annotated[Optional[Path], typer.Option(help="also write an example CSV for `dedn predict --new-classes` (every attribute column, one example class)")] = None,  # noqa: UP045,E501
) -> None:
    """What a trained run is: its seen and unseen classes, attribute groups, the gamma it chose (and where
    from), and its T, U, S, H, AUSUC."""
    from dedn.apps.describe import describe_run, format_description, public, write_classes_template

    desc = describe_run(run)
    typer.echo(json.dumps(public(desc), indent=2) if as_json else format_description(desc))
    if new_classes_template is not None:
        path = write_classes_template(desc, new_classes_template)
        typer.echo(f"wrote {path}: edit it, then `dedn predict --run {run} --new-classes {path} IMAGES`",
                   err=as_json)


# ---------------------------------------------------------------------------------------------- predict / explain
NEW_CLASSES_HELP = ("classes given by attribute vectors: a CSV with a header row (class, then attribute names, any "
                    "order) and one row per class (name, then values), or JSON {class: {attribute: value}} or "
                    "{class: [D values]}; `dedn describe --run RUN --new-classes-template new.csv` writes an example")
#: Where predict and explain find an image's true class (dedn.apps.predict.true_classes).
TRUE_CLASS_HELP = ("the class in an index.csv beside the image (as `dedn samples` writes it), else in a file name "
                   "`<class>__<n>.png` or the image's folder name, where it names a class of the run")
PREDICT_HELP = ("Top-k classes for images, each with the attributes that contributed most.\n\n"
                "The image's true class, where known, is printed and marked * in the table (`true_class` with "
                f"--json): {TRUE_CLASS_HELP}.")


@app.command(help=PREDICT_HELP)
def predict(
    run: Annotated[Path, typer.Option("--run", help="run directory of a trained model")],
    inputs: Annotated[list[Path], typer.Argument(help="image files or folders")],
    top_k: Annotated[int, typer.Option(help="classes to list per image")] = 5,
    new_classes: Annotated[Optional[Path], typer.Option(help=NEW_CLASSES_HELP)] = None,  # noqa: UP045
    only_new: Annotated[bool, typer.Option("--only-new/--no-only-new",
                                           help="with --new-classes: drop the trained classes")] = False,
    fill: Annotated[Optional[float], typer.Option(help="with --new-classes: value of attributes a class omits")] = None,  # noqa: UP045,E501
    backbone: Annotated[Optional[str], typer.Option(help=f"for runs trained on precomputed features, the backbone to compute image features with: {_listed(BACKBONE_REGISTRY)}, or timm:<model name>")] = None,  # noqa: UP045,E501
    l_e: Annotated[Optional[float], typer.Option(help="cExp/fExp mix (default: the run's)")] = None,  # noqa: UP045
    gamma: Annotated[Optional[float], typer.Option(help="calibration (default: the run's)")] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="search folders recursively")] = False,
    precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP)] = None,  # noqa: UP045
) -> None:
    from dedn.checks import ATTRIBUTE_VALUE, COUNT, FINITE, FRACTION, check_option, choice
    from dedn.devices import PRECISIONS

    # Before the run is loaded; --l-e is model.l_e and --gamma eval.calibration, with the config's rules.
    check_option("--top-k", top_k, COUNT)
    check_option("--l-e", l_e, FRACTION)
    check_option("--gamma", gamma, FINITE)
    check_option("--fill", fill, ATTRIBUTE_VALUE)
    check_option("--precision", precision, choice(*PRECISIONS))

    from dedn.apps.class_files import load_class_definitions
    from dedn.apps.predict import Predictor, format_table, predictions_to_json

    predictor = Predictor.from_run(run, backbone=backbone, precision=precision)
    if new_classes is not None:
        names, att = load_class_definitions(new_classes, predictor.attribute_names, fill=fill)
        predictor = predictor.with_classes(names, att, include_trained=not only_new)
    preds = predictor.predict_images([str(p) for p in inputs], top_k=top_k, l_e=l_e, gamma=gamma,
                                     recursive=recursive)
    typer.echo(predictions_to_json(preds) if as_json else format_table(preds))


@app.command()
def explain(
    run: Annotated[Path, typer.Option("--run", help="run directory of a trained model")],
    image: Annotated[Path, typer.Argument(help="an image file")],
    attribute: Annotated[Optional[list[str]], typer.Option("--attribute", "-a", help="attribute names (repeatable)")] = None,  # noqa: UP045,E501
    top_attributes: Annotated[int, typer.Option(help="without --attribute: how many attributes to show, those contributing most to the explained class (predict's --top-k counts classes)")] = 4,  # noqa: E501
    out: Annotated[Path, typer.Option(help="output folder")] = Path("explanations"),
    class_name: Annotated[Optional[str], typer.Option("--class", help="explain this class instead of the prediction")] = None,  # noqa: UP045,E501
    backbone: Annotated[Optional[str], typer.Option(help=f"for runs trained on precomputed features, the backbone to compute image features with: {_listed(BACKBONE_REGISTRY)}, or timm:<model name>")] = None,  # noqa: UP045,E501
    true_class: Annotated[Optional[str], typer.Option(help=f"the image's true class, named in the figure (default: {TRUE_CLASS_HELP})")] = None,  # noqa: UP045,E501
) -> None:
    """Per-attribute region attention of both experts over an image (PNG), channel attention summarised."""
    from dedn.checks import COUNT, check_option, check_output_folder

    check_option("--top-attributes", top_attributes, COUNT)
    check_output_folder("--out", out)

    from dedn.apps.explain import ExplainOptions, explain_image
    from dedn.apps.predict import Predictor

    predictor = Predictor.from_run(run, backbone=backbone)
    paths = explain_image(predictor, image, out_dir=out, options=ExplainOptions(
        attributes=attribute, top=top_attributes, class_name=class_name, true_class=true_class))
    for p in paths:
        typer.echo(str(p))


INTERRUPTED = "interrupted; a training run can be continued with `dedn train --resume RUN_DIR`"


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while handling a KeyboardInterrupt (that is, because of Ctrl-C)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def main() -> None:
    """Console entry point: library errors become one clear line and exit status 2; Ctrl-C says how to resume.

    Click (inside typer) turns Ctrl-C into a silent exit: ``Exit(130)`` in click >= 8.2, an "Aborted!" exit 1
    before. Both are raised while handling the KeyboardInterrupt, so the SystemExit's exception chain tells
    Ctrl-C apart from other exits; click keeps printing usage errors (2), --help and --version (0) itself.
    """
    from dedn.hostmemory import keep_freed_host_memory

    keep_freed_host_memory()  # every command: the steps and batches reuse freed memory (docs/performance.md)
    try:
        app()
    except DednError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except SystemExit as exc:
        if _interrupted(exc):
            typer.echo(INTERRUPTED, err=True)
            sys.exit(130)
        raise
    except KeyboardInterrupt:  # outside click's own handling
        typer.echo(INTERRUPTED, err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

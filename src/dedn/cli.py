"""The ``dedn`` command: a thin layer over the library API (every command is a few calls into it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import DednError

app = typer.Typer(
    name="dedn",
    help="DEDN (Dual Expert Distillation Network) for generalized zero-shot learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(help="Feature stores: import and export DAZLE/DEDN HDF5 files, inspect.", no_args_is_help=True)
app.add_typer(store_app, name="store")

Overrides = Annotated[Optional[list[str]], typer.Argument(help="dotted.key=value config overrides")]  # noqa: UP045


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


def _print_metrics(metrics: dict, title: str) -> None:
    keys = [k for k in ("T", "S", "U", "H", "AUSUC") if k in metrics]
    typer.echo(title)
    typer.echo("  " + "  ".join(f"{k:>6}" for k in keys))
    typer.echo("  " + "  ".join(f"{metrics[k]:6.2f}" for k in keys) + f"   (%, gamma = {metrics.get('gamma', 0):.3g})")


# ---------------------------------------------------------------------------------------------- train / eval
@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file or preset name")] = None,  # noqa: UP045
    overrides: Overrides = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="run directory (default: OUTPUT_DIR/NAME-TIME)")] = None,  # noqa: UP045
    resume: Annotated[Optional[Path], typer.Option(help="continue the run in this directory")] = None,  # noqa: UP045
) -> None:
    """Train DEDN; writes a run directory with config, log, checkpoints and metrics."""
    from .config import find_config, load_config
    from .training import load_run_config
    from .training import train as train_run

    if resume is not None:
        if config is not None or overrides:
            raise DednError(f"{resume}: a resumed run keeps its own config; drop --config and the overrides")
        cfg = load_run_config(resume)
        result = train_run(cfg, run_dir=resume, resume=True)
    else:
        cfg = load_config(find_config(config) if config else None, overrides or [])
        result = train_run(cfg, run_dir=run_dir)
    _print_metrics(result.metrics, f"DEDN ({cfg.mode} mode), test split, run {result.run_dir}")


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="run directory of a trained model")],
    calibration: Annotated[Optional[str], typer.Option(help="calibrated-stacking value (number)")] = None,  # noqa: UP045
    l_rc: Annotated[Optional[float], typer.Option(help="region/channel mix (default: the run's)")] = None,  # noqa: UP045
    l_e: Annotated[Optional[float], typer.Option(help="cExp/fExp mix (default: the run's)")] = None,  # noqa: UP045
    out: Annotated[Optional[Path], typer.Option(help="output folder (default: RUN/eval)")] = None,  # noqa: UP045
    overrides: Overrides = None,
) -> None:
    """Evaluate a trained run on its test split: T, S, U, H, AUSUC, per-class accuracy, seen-unseen curve."""
    from .checkpoint import load_weights
    from .config import apply_overrides
    from .factory import load_data
    from .training import calibration_value, evaluate_model, load_run_config, resolve_device, write_evaluation

    cfg = apply_overrides(load_run_config(checkpoint), overrides or [], f"{checkpoint}/config.json")
    weights = Path(checkpoint) / "model.safetensors"
    if not weights.exists() and (Path(checkpoint) / "checkpoints" / "last.safetensors").exists():
        weights = Path(checkpoint) / "checkpoints" / "last.safetensors"
    device = resolve_device(cfg.train.device)
    model = load_weights(weights, device=device)
    data = load_data(cfg)
    gamma = float(calibration) if calibration is not None else calibration_value(cfg, data)
    ev = evaluate_model(model, data, gamma, cfg.eval.batch_size, device, progress=True, l_rc=l_rc, l_e=l_e)
    folder = out or Path(checkpoint) / "eval"
    metrics = write_evaluation(ev, folder, data.class_names, {
        "mode": cfg.mode, "split": cfg.data.split, "l_rc": l_rc if l_rc is not None else model.l_rc,
        "l_e": l_e if l_e is not None else model.l_e, "checkpoint": str(weights), "version": __version__})
    _print_metrics(metrics, f"DEDN ({cfg.mode} mode), {cfg.data.split} split; written to {folder}")


# ---------------------------------------------------------------------------------------------- bench
@app.command()
def bench(
    preset: Annotated[str, typer.Option(help="cub, sun or awa2: the real shapes")] = "cub",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    repeats: Annotated[int, typer.Option(help="timed steps per implementation")] = 3,
    naive: Annotated[bool, typer.Option(help="also time the naive implementation")] = True,
) -> None:
    """Time a full training step of the fast model against the naive implementation."""
    from .bench import bench_command

    bench_command(preset, json_out=as_json, repeats=repeats, naive=naive)


# ---------------------------------------------------------------------------------------------- features
@app.command()
def extract(
    out: Annotated[Path, typer.Option("--out", help="feature store folder to write (resumed if it exists)")],
    images: Annotated[Path, typer.Option(help="image root (xlsa17 dataset root, or a folder of class folders)")],
    xlsa17: Annotated[Optional[Path], typer.Option(help="xlsa17 folder of the dataset (att_splits.mat, res101.mat)")] = None,  # noqa: UP045,E501
    dataset: Annotated[Optional[str], typer.Option(help="CUB, SUN or AWA2 (with --xlsa17)")] = None,  # noqa: UP045
    backbone: Annotated[str, typer.Option(help="resnet101 or efficientnet-lite0")] = "resnet101",
    weights: Annotated[str, typer.Option(help="'imagenet' (download) or a local weights file")] = "imagenet",
    image_size: Annotated[Optional[int], typer.Option(help="input size (CUB/SUN 448, AWA2 224)")] = None,  # noqa: UP045
    batch_size: Annotated[int, typer.Option()] = 32,
    workers: Annotated[int, typer.Option(help="DataLoader workers")] = 2,
    device: Annotated[str, typer.Option()] = "auto",
    dtype: Annotated[str, typer.Option(help="float16 or float32")] = "float16",
    overwrite: Annotated[bool, typer.Option(help="replace an existing store")] = False,
) -> None:
    """Extract frozen-backbone region feature maps into a feature store (resumable; torchrun to shard)."""
    from .backbones import get_backbone
    from .extract import extract_features, extract_folder

    bb = get_backbone(backbone, weights=weights)
    common = dict(batch_size=batch_size, num_workers=workers, device=device, dtype=dtype, overwrite=overwrite)
    if xlsa17 is None:
        store = extract_folder(images, out, bb, image_size, **common)
    else:
        from .xlsa17 import canonical_dataset, read_semantic_dir, resolve_image_paths

        sem = read_semantic_dir(xlsa17, dataset=dataset)
        if sem.image_files is None or sem.labels is None:
            raise DednError(f"{xlsa17}: no image list (res101.mat) found; it is part of the xlsa17 download")
        name = canonical_dataset(dataset or sem.name) or sem.name
        size = image_size or (224 if name == "AWA2" else 448)
        paths = resolve_image_paths(sem.image_files, images, name)
        store = extract_features(paths, sem.labels, out, bb, size, provenance_extra={"dataset": name}, **common)
        store.save_semantics(att=sem.att, w2v=sem.w2v, trainval_loc=sem.trainval_loc, test_seen_loc=sem.test_seen_loc,
                             test_unseen_loc=sem.test_unseen_loc, class_names=list(sem.class_names),
                             attribute_names=list(sem.attribute_names), original_att=sem.original_att,
                             val_classes=sem.val_classes, image_files=list(sem.image_files), name=name)
    typer.echo(f"feature store {out}: {len(store)} images, shape {tuple(store.shape[1:])}")


@store_app.command("import")
def store_import(
    h5: Annotated[Path, typer.Argument(help="DAZLE/DEDN-layout HDF5 file")],
    out: Annotated[Path, typer.Argument(help="feature store folder to write (resumed if it exists)")],
    dtype: Annotated[str, typer.Option(help="float16 or float32")] = "float16",
    name: Annotated[Optional[str], typer.Option(help="dataset name (CUB, SUN, AWA2)")] = None,  # noqa: UP045
) -> None:
    """Import an HDF5 feature file into a float16 memory-mapped store, in bounded memory."""
    from .store import import_hdf5

    store = import_hdf5(h5, out, dtype=dtype, name=name)
    typer.echo(f"feature store {out}: {len(store)} images, shape {tuple(store.shape[1:])}")


@store_app.command("export")
def store_export(
    store: Annotated[Path, typer.Argument(help="feature store folder")],
    h5: Annotated[Path, typer.Argument(help="HDF5 file to write")],
) -> None:
    """Export a store back to the DAZLE/DEDN HDF5 layout."""
    from .store import export_hdf5

    typer.echo(f"wrote {export_hdf5(store, h5)}")


@store_app.command("info")
def store_info(store: Annotated[Path, typer.Argument(help="feature store folder")]) -> None:
    """Print a store's shape, completeness and provenance."""
    from .store import FeatureStore

    s = FeatureStore.open(store)
    typer.echo(json.dumps({"path": str(s.path), "shape": list(s.shape), "complete": s.complete,
                           "provenance": s.provenance}, indent=2, default=str))


def main() -> None:
    """Console entry point: library errors become one clear line and exit status 2."""
    try:
        app()
    except DednError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; a training run can be continued with `dedn train --resume RUN_DIR`", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

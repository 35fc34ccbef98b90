"""Bad numbers are refused up front: one `error:` line naming the key or option, exit status 2, no work done."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dedn import checks
from dedn.apps.class_files import load_class_definitions
from dedn.cli import INTERRUPTED
from dedn.config import config_from_dict, config_to_dict, load_config
from dedn.errors import ConfigError, DataError
from dedn.models.dedn import DEDN, DEDNConfig
from dedn.training.checkpoint import save_weights
from dedn.training.rundir import write_class_file

from .conftest import run_cli

ATTRS = ["wing_color::blue", "bill_shape::hooked", "leg_color::grey"]
CLASSES = ["albatross", "bunting", "cardinal"]




def assert_one_error_line(code: int, err: str, *names: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def make_run(folder: Path) -> Path:
    """A tiny trained-looking run directory (random weights): enough for predict to read its classes."""
    rng = np.random.default_rng(0)
    config = DEDNConfig(n_attributes=len(ATTRS), semantic_dim=4, n_channels=4, n_regions=4, clusters=((0, 1), (2,)))
    model = DEDN.from_config(config, rng.normal(size=(len(ATTRS), 4)), rng.random((len(CLASSES), len(ATTRS))),
                             np.array([True, True, False]))
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_to_dict(load_config())))
    save_weights(model, folder / "model.safetensors", record_hash=True)
    write_class_file(folder, {"class_names": CLASSES, "attribute_names": ATTRS,
                              "class_att": rng.random((len(CLASSES), len(ATTRS))), "seen_mask": [True, True, False]})
    return folder


# ---------------------------------------------------------------------------------------------- config values
# (override, the key the error must name, what the message must say)
BAD_CONFIG = [
    ("eval.calibration=nan", "eval.calibration", "auto, validated or a finite number, got 'nan'"),
    ("eval.calibration=-inf", "eval.calibration", "finite number"),
    ("eval.calibration=high", "eval.calibration", "got 'high'"),
    ("eval.batch_size=0", "eval.batch_size", "an integer >= 1, got 0"),
    ("eval.curve_points=1", "eval.curve_points", "an integer >= 2, got 1"),
    ("train.iters_per_epoch=0", "train.iters_per_epoch", "an integer >= 1 or null, got 0"),
    ("train.max_iters=-1", "train.max_iters", "an integer >= 1 or null, got -1"),
    ("train.lr=nan", "train.lr", "a finite number > 0, got nan"),
    ("train.lr=0", "train.lr", "a finite number > 0, got 0.0"),
    ("train.device=tpu", "train.device", "one of {auto, cpu, cuda, cuda:N}, got 'tpu'"),
    ("train.device=cuda:x", "train.device", "cuda:N"),
    ("train.threads=-1", "train.threads", "an integer >= 1 or null, got -1"),
    ("train.epochs=-1", "train.epochs", "an integer >= 0"),
    ("train.batch_size=0", "train.batch_size", "an integer >= 1"),
    ("train.momentum=1", "train.momentum", "a finite number in [0, 1), got 1.0"),
    ("train.weight_decay=inf", "train.weight_decay", "a finite number >= 0, got inf"),
    ("train.alpha=0", "train.alpha", "a finite number in (0, 1)"),
    ("train.eps=0", "train.eps", "a finite number > 0"),
    ("train.eval_every=-1", "train.eval_every", "an integer >= 0"),
    ("train.checkpoint_every=-2", "train.checkpoint_every", "an integer >= 0"),
    ("train.dtype=float16", "train.dtype", "one of {float32, float64}"),
    ("loss.beta=-0.1", "loss.beta", "a finite number >= 0"),
    ("loss.gamma=nan", "loss.gamma", "got nan"),
    ("loss.margin=inf", "loss.margin", "a finite number >= 0, got inf"),
    ("data.val_seen_fraction=1", "data.val_seen_fraction", "a finite number in (0, 1)"),
    ("data.synthetic.n_images=0", "data.synthetic.n_images", "an integer >= 1"),
    ("data.synthetic.noise=nan", "data.synthetic.noise", "got nan"),
    ("data.image_size=100", "data.image_size", "a positive multiple of 32"),
    ("data.imagebench.clutter=nan", "data.imagebench.clutter", "got nan"),
    ("data.imagebench.n_classes=1", "data.imagebench.n_classes", "at least 2"),
    ("model.l_e=2", "model.l_e", "a finite number in [0, 1], got 2.0"),
    ("model.l_rc=nan", "model.l_rc", "a finite number in [0, 1], got nan"),
    ("model.low_rank=0", "model.low_rank", "an integer >= 1 or null"),
    ("model.n_clusters=0", "model.n_clusters", "an integer >= 1 or null"),
    ("mode=fast", "mode", "one of {paper, reference}, got 'fast'"),
    ("seed=-1", "seed", "an integer >= 0"),
]


@pytest.mark.parametrize(("override", "key", "says"), BAD_CONFIG, ids=[c[0] for c in BAD_CONFIG])
def test_bad_config_values_fail_train_before_any_work(override: str, key: str, says: str,
                                                      tiny_overrides: list[str], tmp_path: Path,
                                                      monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--run-dir", str(run), *tiny_overrides, override], monkeypatch, capsys)
    line = assert_one_error_line(code, err, f"{key} must", says)
    assert line.startswith("error: defaults + overrides: ")
    assert not run.exists()  # refused before data, model or run directory


@pytest.mark.parametrize(("override", "key", "says"), BAD_CONFIG, ids=[c[0] for c in BAD_CONFIG])
def test_bad_config_values_in_a_file(override: str, key: str, says: str, tmp_path: Path) -> None:
    # The same check for a YAML file, a run's config.json (resume, eval) and overrides.
    dotted, value = override.split("=", 1)
    tree: dict = {}
    node = tree
    for part in dotted.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[dotted.split(".")[-1]] = value
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(tree))  # JSON is YAML; the value is given as text, as on the command line
    with pytest.raises(ConfigError, match=f"^{path}: {key} must"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"^run/config.json: {key} must"):
        config_from_dict(tree, "run/config.json")


def test_good_values_pass() -> None:
    cfg = load_config(None, ["eval.calibration=-0.5", "train.device=cuda:1", "train.threads=1", "train.max_iters=1",
                             "train.iters_per_epoch=null", "model.l_e=1", "model.l_rc=0", "train.momentum=0",
                             "train.epochs=0", "train.eval_every=0", "data.image_size=448"])
    assert cfg.eval.calibration == "-0.5" and cfg.train.device == "cuda:1"
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_packaged_configs_pass(tmp_path: Path) -> None:
    from dedn.config import find_config

    for name in ("demo", "cub-gzsl", "cub-zsl", "sun-gzsl", "sun-zsl", "awa2-gzsl", "awa2-zsl"):
        load_config(find_config(name), [f"data.path={tmp_path}"])


# ---------------------------------------------------------------------------------------------- CLI options
# (arguments after the command, the option the error must name, what the message must say)
BAD_OPTIONS = [
    (["predict", "--top-k", "0"], "--top-k", "an integer >= 1, got 0"),
    (["predict", "--top-k", "-3"], "--top-k", "an integer >= 1, got -3"),
    (["predict", "--l-e", "2"], "--l-e", "a finite number in [0, 1], got 2.0"),
    (["predict", "--l-e", "5"], "--l-e", "a finite number in [0, 1], got 5.0"),
    (["predict", "--l-e", "nan"], "--l-e", "got nan"),
    (["predict", "--gamma", "nan"], "--gamma", "a finite number, got nan"),
    (["predict", "--gamma", "inf"], "--gamma", "a finite number, got inf"),
    (["predict", "--fill", "1e300"], "--fill", "|value| <= 1e6"),
    (["explain", "--top-attributes", "0"], "--top-attributes", "an integer >= 1, got 0"),
    (["extract", "--image-size", "0"], "--image-size", "a positive multiple of 32"),
    (["extract", "--image-size", "100"], "--image-size", "a positive multiple of 32"),
    (["extract", "--workers", "-1"], "--workers", "an integer >= 0, got -1"),
    (["extract", "--batch-size", "0"], "--batch-size", "an integer >= 1, got 0"),
    (["extract", "--device", "tpu"], "--device", "one of {auto, cpu, cuda, cuda:N}"),
    (["extract", "--dtype", "float64"], "--dtype", "one of {float16, float32}"),
    (["extract", "--test-fraction", "1"], "--test-fraction", "a finite number in (0, 1), got 1.0"),
    (["extract", "--seed", "-1"], "--seed", "an integer >= 0, got -1"),
]


@pytest.mark.parametrize(("args", "option", "says"), BAD_OPTIONS, ids=[" ".join(c[0]) for c in BAD_OPTIONS])
def test_bad_options_fail_before_any_work(args: list[str], option: str, says: str, tmp_path: Path,
                                          monkeypatch, capsys) -> None:
    command, rest = args[0], args[1:]
    out = tmp_path / "out"
    # The run, images and store do not exist: the option is refused before any of them is looked at.
    where = {"predict": ["--run", str(tmp_path / "run"), str(tmp_path / "a.png")],
             "explain": ["--run", str(tmp_path / "run"), str(tmp_path / "a.png"), "--out", str(out)],
             "extract": ["--out", str(out), "--images", str(tmp_path / "images")]}[command]
    code, _, err = run_cli([command, *where, *rest], monkeypatch, capsys)
    assert_one_error_line(code, err, f"error: {option} must", says)
    assert not out.exists()


# (arguments, what the one error line must say: the key or option, and how to fix it); nothing runs before it
BAD_INPUTS = [
    (["train", "train.epochs=abc"], ["train.epochs=abc: not an integer; give an integer, e.g. train.epochs="]),
    (["train", "train.lr=fast"], ["train.lr=fast: not a number; give a number"]),
    (["train", "train.balanced=maybe"], ["train.balanced=maybe: not true or false; give true or false"]),
    (["train", "--config", "no-such-preset"], ["no-such-preset: no such config file", "one of: demo, ", "cub-gzsl"]),
    (["train", "data.source=store"], ["data.path", "`dedn extract`", "`dedn store import`"]),
    (["train", "data.source=store", "data.path=NOWHERE"], ["NOWHERE: no such feature store folder", "`dedn extract`",
                                                          "`dedn store import`"]),
    (["train", "--resume", "NOWHERE"], ["NOWHERE: not a dedn run directory", "give a folder that `dedn train` wrote"]),
    (["store", "info", "NOWHERE"], ["NOWHERE is not a feature store", "`dedn extract`", "`dedn store import`"]),
    (["experiment", "table1", "--devices", "gpu7"], ["--devices 'gpu7'", "give cpu, cuda or cuda:N"]),
    (["experiment", "table1", "--protocol", "maybe"], ["--protocol maybe: give validated, published or both"]),
    (["experiment", "table1", "--seeds", "0"], ["--seeds 0: give how many seeds to run, at least 1"]),
    (["experiment", "table1", "--tune", "l_e"], ["--tune 'l_e': give dotted.key=v1,v2"]),
    (["predict", "--run", "NOWHERE", "a.png"], ["NOWHERE: no such run directory; give the folder `dedn train`"]),
    (["train", "model.name=dazle", "train.precision=bf16"], ["train.precision=bf16: DAZLE runs in fp32 only",
                                                            "set train.precision=fp32"]),
    # Before the backbone is built: no download attempted for a folder that is not there.
    (["extract", "--images", "NOWHERE", "--out", "store"], ["--images NOWHERE: no such folder or file"]),
    (["extract", "--images", ".", "--xlsa17", "NOWHERE", "--out", "store"], ["--xlsa17 NOWHERE: no such folder"]),
]


@pytest.mark.parametrize(("args", "says"), BAD_INPUTS, ids=[" ".join(c[0]) for c in BAD_INPUTS])
def test_errors_name_the_key_and_say_how_to_fix_it(args: list[str], says: list[str], tmp_path: Path,
                                                   monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # NOWHERE and any output folder are relative: nothing outside tmp_path
    args = [*args, f"output_dir={tmp_path / 'runs'}"] if args[0] == "train" and "--resume" not in args else args
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert_one_error_line(code, err, *says)
    assert not (tmp_path / "runs").exists()


def test_options_and_config_share_their_rules(monkeypatch, capsys, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as from_config:
        load_config(None, ["model.l_e=2"])
    _, _, err = run_cli(["predict", "--run", str(tmp_path), "x.png", "--l-e", "2"], monkeypatch, capsys)
    assert str(from_config.value).split("model.l_e ", 1)[1] == err.strip().split("--l-e ", 1)[1]


def test_explain_out_must_be_a_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    existing = tmp_path / "picture.png"
    existing.write_bytes(b"not a folder")
    args = ["explain", "--run", str(tmp_path / "run"), str(tmp_path / "a.png"), "--out"]
    code, _, err = run_cli([*args, str(existing)], monkeypatch, capsys)
    line = assert_one_error_line(code, err, "--out must be a folder", str(existing))
    assert line == f"error: --out must be a folder, got the existing file {existing}"
    code, _, err = run_cli([*args, str(existing / "sub")], monkeypatch, capsys)
    assert_one_error_line(code, err, "--out must be a folder", f"under the file {existing}")
    assert existing.read_bytes() == b"not a folder"


def test_explain_image_checks_out_dir_first(tmp_path: Path) -> None:
    from dedn.apps.explain import explain_image

    existing = tmp_path / "f.txt"
    existing.write_text("x")
    # The source does not exist either: out_dir is checked before the run is read.
    with pytest.raises(ConfigError, match="out_dir must be a folder"):
        explain_image(tmp_path / "no-run", tmp_path / "a.png", out_dir=existing)


# ---------------------------------------------------------------------------------------------- class files
@pytest.mark.parametrize("value", ["1e300", "-2e6", "1e400", "nan"])
def test_class_values_must_be_finite_and_moderate(value: str, tmp_path: Path) -> None:
    csv_file = tmp_path / "new.csv"
    csv_file.write_text(f"class,{','.join(ATTRS)}\nheron,0.5,{value},1\n")
    with pytest.raises(DataError, match=r"new\.csv: class 'heron', attribute 'bill_shape::hooked'"):
        load_class_definitions(csv_file, ATTRS)
    json_file = tmp_path / "new.json"
    json_file.write_text(f'{{"heron": {{"wing_color::blue": 0.5, "bill_shape::hooked": {value}, '
                         f'"leg_color::grey": 1}}}}'.replace("nan", "NaN"))  # JSON spells it NaN
    with pytest.raises(DataError, match=r"new\.json: class 'heron', attribute 'bill_shape::hooked'"):
        load_class_definitions(json_file, ATTRS)
    vector = tmp_path / "vector.json"
    vector.write_text(json.dumps({"heron": [0.5, float(value), 1.0]}))
    with pytest.raises(DataError, match=r"vector\.json: class 'heron', value 1"):
        load_class_definitions(vector, ATTRS)


def test_class_values_up_to_the_limit_pass(tmp_path: Path) -> None:
    csv_file = tmp_path / "new.csv"
    csv_file.write_text(f"class,{','.join(ATTRS)}\nheron,1e6,-1e6,0\n")
    names, att = load_class_definitions(csv_file, ATTRS)
    assert names == ["heron"] and np.isfinite(att).all()
    with pytest.raises(ConfigError, match=r"fill must be a finite number with \|value\| <= 1e6, got nan"):
        load_class_definitions(csv_file, ATTRS, fill=float("nan"))


def test_predict_class_file_error_names_file_class_and_attribute(tmp_path: Path, monkeypatch, capsys) -> None:
    run = make_run(tmp_path / "run")
    bad = tmp_path / "new.csv"
    bad.write_text(f"class,{','.join(ATTRS)}\nheron,0.5,1e300,1\n")
    code, _, err = run_cli(["predict", "--run", str(run), "--new-classes", str(bad), str(tmp_path / "a.png")],
                           monkeypatch, capsys)
    line = assert_one_error_line(code, err, str(bad), "class 'heron'", "attribute 'bill_shape::hooked'")
    assert line.endswith("must be a finite number with |value| <= 1e6, got 1e+300")


def test_predictor_top_k(tmp_path: Path) -> None:
    import torch

    from dedn.apps.predict import Predictor

    pred = Predictor.from_run(make_run(tmp_path / "run"))
    feats = torch.rand(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    assert len(pred.predict_features(feats, top_k=99)[0].top) == len(CLASSES)  # clipped to K
    for k in (0, -3):
        with pytest.raises(ConfigError, match=f"top_k must be an integer >= 1, got {k}"):
            pred.predict_features(feats, top_k=k)
        with pytest.raises(ConfigError, match="top_k"):  # before any image is read
            pred.predict_images([tmp_path / "missing.png"], top_k=k)


# ---------------------------------------------------------------------------------------------- rules
def test_rules() -> None:
    assert checks.FRACTION.test(0.0) and checks.FRACTION.test(1) and not checks.FRACTION.test(float("nan"))
    assert not checks.COUNT.test(True) and not checks.COUNT.test(1.0) and checks.COUNT.test(3)
    assert checks.optional(checks.COUNT).test(None) and not checks.COUNT.test(None)
    assert checks.IMAGE_SIZE.test(224) and not checks.IMAGE_SIZE.test(16) and not checks.IMAGE_SIZE.test(230)
    assert checks.DEVICE.test("cuda:0") and not checks.DEVICE.test("cuda0") and not checks.DEVICE.test("mps")
    assert checks.CALIBRATION.test("1e-3") and not checks.CALIBRATION.test("nan")
    with pytest.raises(ConfigError, match=r"^cfg.yaml: a.b must be a finite number > 0, got inf$"):
        checks.check("a.b", float("inf"), checks.POSITIVE, "cfg.yaml")
    checks.check_option("--x", None, checks.COUNT)  # not given: the default applies


# ---------------------------------------------------------------------------------------------- exits
def test_ctrl_c_in_a_command_prints_the_resume_hint(tiny_overrides: list[str], monkeypatch, capsys) -> None:
    import dedn.config

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dedn.config, "load_config", interrupted)  # `dedn train` imports it when it runs
    code, _, err = run_cli(["train", *tiny_overrides], monkeypatch, capsys)
    assert code == 130 and err.strip() == INTERRUPTED


def test_sigint_prints_the_resume_hint(tmp_path: Path) -> None:
    script = tmp_path / "wait.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from dedn import cli

        @cli.app.command("wait")
        def wait() -> None:
            print("ready", flush=True)
            time.sleep(60)

        sys.argv = ["dedn", "wait"]
        cli.main()
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip() == INTERRUPTED


@pytest.mark.parametrize(("args", "code"), [(["--help"], 0), (["--version"], 0), (["train", "--help"], 0),
                                            (["train", "--no-such-option"], 2), (["no-such-command"], 2), ([], 2)])
def test_exit_codes_are_kept(args: list[str], code: int, monkeypatch, capsys) -> None:
    got, out, err = run_cli(args, monkeypatch, capsys)
    assert got == code and "Traceback" not in err and INTERRUPTED not in err
    assert (out if code == 0 or not args else err).strip()

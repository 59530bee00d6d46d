"""Every command through click: --help, a user error (one line, status 1), a genuine bug (its
traceback kept), Ctrl-C (status 130), and the option checks of tclf-train and tclf-eval.

The successes of tclf-predict and tclf-eval are in test_predict_eval.py, tclf-extract's and
tclf-pack's below; tclf-train's success is the slow test at the end.
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from tclf import InputError, cli
from tclf.data import extract, records
from tclf.training import train
from tests.conftest import TINY_TRAINING

COMMANDS = {"tclf-extract": cli.extract_command, "tclf-pack": cli.pack_command,
            "tclf-train": cli.train_command, "tclf-predict": cli.predict_command,
            "tclf-eval": cli.eval_command, "tclf-tune": cli.tune_command}
# A call of each command that reaches its library function, and that function's name.
CALLS = {"tclf-extract": (["a", "d"], extract, "extract"),
         "tclf-pack": (["d", "r"], records, "pack"),
         "tclf-train": (["--records", "r"], train, "train"),
         "tclf-predict": (["x.wav"], __import__("tclf.predict").predict, "predict_paths"),
         "tclf-eval": (["--model", "m.h5"], __import__("tclf.model").model, "load_model"),
         "tclf-tune": (["--records", "r", "--out", "o"], __import__("tclf.tune.search").tune.search, "tune")}


@pytest.mark.parametrize("name", COMMANDS)
def test_help(name):
    done = CliRunner().invoke(COMMANDS[name], ["--help"])
    assert done.exit_code == 0 and "Usage:" in done.output and "--help" in done.output


@pytest.mark.parametrize("name", COMMANDS)
def test_user_error_is_one_line_with_status_1(name, monkeypatch):
    args, module, function = CALLS[name]

    def fail(*a, **k):
        raise InputError("the folder x has no classes\nsecond line")

    monkeypatch.setattr(module, function, fail)
    done = CliRunner().invoke(COMMANDS[name], args)
    assert done.exit_code == 1, done.output
    assert done.output.strip() == "Error: InputError: the folder x has no classes"


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("bug", [KeyError("oops"), ValueError("bad internal value"),
                                 RuntimeError("internal")])
def test_a_genuine_bug_keeps_its_traceback(name, bug, monkeypatch):
    args, module, function = CALLS[name]

    def fail(*a, **k):
        raise bug

    monkeypatch.setattr(module, function, fail)
    done = CliRunner().invoke(COMMANDS[name], args)
    assert done.exit_code == 1
    assert done.exception is bug  # Not turned into a one-line message: click shows it whole.


@pytest.mark.parametrize("name", COMMANDS)
def test_ctrl_c_exits_with_130(name, monkeypatch):
    args, module, function = CALLS[name]

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, function, interrupt)
    done = CliRunner().invoke(COMMANDS[name], args)
    assert done.exit_code == 130 and "interrupted" in done.output


def test_extract_and_pack_succeed_and_fail_on_a_missing_folder(audio_dir, tmp_path):
    runner = CliRunner()
    done = runner.invoke(cli.extract_command, [os.path.join(audio_dir), str(tmp_path / "d"),
                                               "-q", "--jobs", "1", "--segments", "1",
                                               "--training-segments", "0"])
    assert done.exit_code == 0 and "extracted 12 tracks" in done.output, done.output
    done = runner.invoke(cli.pack_command, [str(tmp_path / "d"), str(tmp_path / "r"), "-q",
                                            "--min-shards", "1"])
    assert done.exit_code == 0 and "packed 12 records" in done.output, done.output
    for command, args in ((cli.extract_command, [str(tmp_path / "no"), str(tmp_path / "d2")]),
                          (cli.pack_command, [str(tmp_path / "no"), str(tmp_path / "r2")])):
        done = runner.invoke(command, args)
        assert done.exit_code == 1 and "no such folder" in done.output
        assert len(done.output.strip().splitlines()) == 1


def test_eval_split_must_be_a_split():
    done = CliRunner().invoke(cli.eval_command, ["--split", "test"])
    assert done.exit_code == 2 and "'test' is not one of 'train', 'val'" in done.output


def test_hparams_values_are_type_checked_and_accept_dashes(tmp_path):
    config = train.TrainConfig().replace(**{"stage1-lr": 3e-4, "image_size": 64, "dropout": 1})
    assert config.stage1_lr == 3e-4 and config.image_size == 64
    assert config.dropout == 1.0 and type(config.dropout) is float
    for bad in ({"image_size": "299"}, {"image-size": 2.5}, {"cache": 1}, {"gpus": 0}):
        with pytest.raises(InputError, match="expected"):
            train.TrainConfig().replace(**bad)
    with pytest.raises(InputError, match="unknown option"):
        train.TrainConfig().replace(learning_rate=1)
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"image-size": "299"}))
    done = CliRunner().invoke(cli.train_command, ["--hparams", str(path)])
    assert done.exit_code == 1
    assert done.output.strip() == "Error: InputError: option image-size: expected int, got '299'"


def test_bad_stage2_layers_is_refused_before_a_version_folder_is_claimed(records_dir, tmp_path):
    models = tmp_path / "models"
    done = CliRunner().invoke(cli.train_command, ["--records", records_dir, "--models-dir",
                                                  str(models), "--stage2-layers", "100000"])
    assert done.exit_code == 1 and "stage2_layers must be 0-" in done.output
    assert not models.exists() or os.listdir(models) == []


@pytest.mark.slow
def test_train_cli_success_with_an_hparams_file(records_dir, tmp_path):
    options = {**TINY_TRAINING, "verbose": 0}
    hparams = {name.replace("_", "-"): value for name, value in options.items()
               if name not in ("stage1_epochs",)}
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({**hparams, "dropout": 0.3, "stage1_epochs": 5}))
    models = tmp_path / "models"
    done = CliRunner().invoke(cli.train_command, ["--hparams", str(path), "--records",
                                                  records_dir, "--models-dir", str(models),
                                                  "--stage1-epochs", "1"])
    assert done.exit_code == 0, done.output
    assert "trained" in done.output and "validation accuracy" in done.output
    config = json.loads((models / "v1" / "config.json").read_text())
    assert config["dropout"] == 0.3  # From the file.
    assert config["stage1_epochs"] == 1  # The command line wins over the file.
    assert (models / "latest.h5").exists()


def test_option_names_are_consistent(trained, audio_dir):
    runner = CliRunner()
    good = sorted(os.path.join(root, f) for root, _, files in os.walk(audio_dir)
                  for f in files if f.endswith(".wav"))[0]
    done = runner.invoke(cli.predict_command, [good, "--model", trained.model_path,
                                               "--per-segment", "--format", "json", "-q"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["tracks"][0]["segments"]
    # --segments is tclf-extract's count; tclf-predict does not take it as a flag.
    assert runner.invoke(cli.predict_command, [good, "--segments"]).exit_code == 2
    # The models folder is --models-dir (--model is a file everywhere); -q exists on every
    # command that prints progress or a report.
    help_text = runner.invoke(cli.train_command, ["--help"]).output
    assert "--models-dir" in help_text and "--models " not in help_text
    assert "-q, --quiet" in help_text
    assert "-q, --quiet" in runner.invoke(cli.eval_command, ["--help"]).output
    assert train.TrainConfig().replace(**{"models-dir": "elsewhere"}).models == "elsewhere"


def test_eval_quiet_prints_only_the_final_line(trained, records_dir):
    done = CliRunner().invoke(cli.eval_command, ["--model", trained.model_path, "--records",
                                                 records_dir, "-q"])
    assert done.exit_code == 0, done.output
    assert len(done.output.strip().splitlines()) == 1 and done.output.startswith("accuracy ")


def test_a_command_in_a_fresh_process_prints_one_line_and_no_tensorflow_chatter(tmp_path):
    """TensorFlow's start-up lines (absl, cuda drivers, cuInit) are held back."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "tclf-eval")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",
                                                           "TCLF_DEBUG")}
    done = subprocess.run([script, "--model", str(tmp_path / "missing.h5")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"Error: FileNotFoundError: model file {tmp_path / 'missing.h5'} not found (train one "
        f"with tclf-train, or pass --model)"], done.stderr


def test_extract_and_predict_report_skips_whatever_the_warnings_filter(trained, audio_dir,
                                                                       tmp_path):
    import shutil
    import warnings

    audio = tmp_path / "audio"
    (audio / "goa").mkdir(parents=True)
    good = sorted(os.path.join(root, f) for root, _, files in os.walk(audio_dir)
                  for f in files if f.endswith(".wav"))[0]
    shutil.copy(good, audio / "goa" / "good.wav")
    (audio / "goa" / "broken.wav").write_bytes(b"RIFF not really a wave file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extracted = CliRunner().invoke(cli.extract_command, [str(audio), str(tmp_path / "d"),
                                                             "-q", "--jobs", "1"])
        predicted = CliRunner().invoke(cli.predict_command, [
            str(audio / "goa"), "--model", trained.model_path, "--format", "csv"])
    broken = str(audio / "goa" / "broken.wav")
    for done in (extracted, predicted):
        assert done.exit_code == 0, done.output
        assert any(line.startswith("warning: skipped") and broken in line
                   for line in done.output.splitlines()), done.output
    assert "1 failed" in extracted.output and "1 failed" in predicted.output


@pytest.mark.parametrize("option, value, message", [
    ("dropout", 1.5, "dropout must be in"), ("gru_units", 0, "gru_units must be >= 1"),
    ("attention_heads", 200, "attention_heads must be <= gru_units"),
    ("image_size", 16, "image_size must be >= 32"), ("stage1_lr", 0.0, "learning rates")])
def test_bad_model_settings_are_user_errors_before_a_folder_is_claimed(option, value, message,
                                                                       records_dir, tmp_path):
    config = train.TrainConfig(records=records_dir, models=str(tmp_path / "models"))
    with pytest.raises(InputError, match=message):
        train.train(config.replace(**{option: value}))
    assert not (tmp_path / "models").exists()


def test_hparams_accept_numpy_numbers_as_a_tuner_gives_them():
    import numpy as np

    config = train.TrainConfig().replace(dropout=np.float64(0.3), batch_size=np.int64(16))
    assert type(config.dropout) is float and type(config.batch_size) is int
    assert (config.dropout, config.batch_size) == (0.3, 16)
    with pytest.raises(InputError, match="expected int"):
        train.TrainConfig().replace(batch_size=True)


def test_a_corrupt_manifest_is_one_line(records_dir, tmp_path):
    import shutil

    broken = tmp_path / "records"
    shutil.copytree(records_dir, broken)
    (broken / "manifest.json").write_bytes(b'{"classes": [')
    done = CliRunner().invoke(cli.train_command, ["--records", str(broken), "--models-dir",
                                                  str(tmp_path / "m"), "--weights", "none"])
    assert done.exit_code == 1 and "manifest.json: not a valid JSON file" in done.output
    assert len(done.output.strip().splitlines()) == 1

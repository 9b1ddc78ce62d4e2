"""Training checkpoints as people save them: the state dict is found inside, a wrapper's key prefix is
stripped, ambiguity is an error that lists the candidates; loading stays weights-only."""

import pathlib

import pytest
import torch
from typer.testing import CliRunner

from lstmopt.cli import app
from lstmopt.job.config import load_config
from lstmopt.errors import UntrustedPickleError, UsageError
from lstmopt.artifacts.loading import load_model
from lstmopt.job.pipeline import OptimizeOptions, optimize_file
from models import build_tagger

FACTORY = "models:build_tagger"


@pytest.fixture
def weights():
    torch.manual_seed(3)
    model = build_tagger()
    for p in model.parameters():
        p.data.normal_()  # not what the factory builds, so a load that did nothing would show
    return model.state_dict()


def prefixed(state, prefix):
    return {prefix + key: value for key, value in state.items()}


def assert_loaded(loaded, weights, key=None, prefix=None):
    assert (loaded.state_dict_key, loaded.stripped_prefix) == (key, prefix)
    actual = loaded.model.state_dict()
    assert actual.keys() == weights.keys() and all(torch.equal(actual[k], v) for k, v in weights.items())


@pytest.mark.parametrize("content, key, prefix", [
    (lambda sd: prefixed(sd, "module."), None, "module."),  # DistributedDataParallel
    (lambda sd: {"epoch": 3, "global_step": 100, "state_dict": prefixed(sd, "model.")}, "state_dict", "model."),
    (lambda sd: {"model": sd}, "model", None),
    (lambda sd: {"model_state_dict": sd, "epoch": 1, "optimizer_state_dict": {"state": {}, "param_groups": []}},
     "model_state_dict", None),
    (lambda sd: {"net": prefixed(sd, "_orig_mod.")}, "net", "_orig_mod."),  # a torch.compile'd model
    (lambda sd: {"checkpoint": {"model": {"state_dict": prefixed(sd, "module.model.")}}},
     "checkpoint.model.state_dict", "module.model."),
], ids=["ddp", "lightning", "model", "model_state_dict", "compiled", "nested"])
def test_the_state_dict_is_found_and_its_prefix_stripped(tmp_path, weights, content, key, prefix):
    torch.save(content(weights), tmp_path / "ckpt.pt")
    assert_loaded(load_model(tmp_path / "ckpt.pt", factory=FACTORY), weights, key, prefix)


def test_two_state_dicts_that_fit_are_ambiguous_until_one_is_named(tmp_path, weights):
    ema = {k: v + 1 for k, v in weights.items()}
    torch.save({"model": weights, "ema": ema, "epoch": 9}, tmp_path / "ckpt.pt")
    with pytest.raises(UsageError, match=r"several state dicts that fit the model \('model', 'ema'\); "
                                         r"choose one with --state-dict-key KEY"):
        load_model(tmp_path / "ckpt.pt", factory=FACTORY)
    assert_loaded(load_model(tmp_path / "ckpt.pt", factory=FACTORY, state_dict_key="ema"), ema, "ema")


def test_an_explicit_prefix_is_stripped_and_must_fit(tmp_path, weights):
    torch.save(prefixed(weights, "encoder.body."), tmp_path / "ckpt.pt")
    assert_loaded(load_model(tmp_path / "ckpt.pt", factory=FACTORY, strip_prefix="encoder.body."), weights,
                  prefix="encoder.body.")
    with pytest.raises(UsageError, match="do not fit the model"):
        load_model(tmp_path / "ckpt.pt", factory=FACTORY, strip_prefix="encoder.")


def test_a_key_that_is_not_a_state_dict_lists_what_there_is(tmp_path, weights):
    torch.save({"model": weights, "epoch": 2}, tmp_path / "ckpt.pt")
    with pytest.raises(UsageError, match=r"no mapping of tensors at 'epoch'.*found: model \(\d+ tensors\)"):
        load_model(tmp_path / "ckpt.pt", factory=FACTORY, state_dict_key="epoch")


def test_weights_of_another_model_name_the_closest_candidate_and_the_keys(tmp_path, weights):
    other = {k.replace("lstm.", "rnn."): v for k, v in weights.items()}
    torch.save({"model": other, "ema": other}, tmp_path / "ckpt.pt")
    with pytest.raises(UsageError) as info:
        load_model(tmp_path / "ckpt.pt", factory=FACTORY)
    message = str(info.value)
    assert "closest of 2 candidates" in message and "missing keys: lstm." in message
    assert "unexpected keys: rnn." in message and "--strip-prefix" in message


def test_a_checkpoint_with_python_objects_needs_trust(tmp_path, weights):
    torch.save({"state_dict": weights, "hyper_parameters": {"data_dir": pathlib.PurePosixPath("/data")}},
               tmp_path / "ckpt.pt")
    with pytest.raises(UntrustedPickleError, match=r"holds a dict with Python objects besides tensors.*PurePosixPath.*--trust"):
        load_model(tmp_path / "ckpt.pt", factory=FACTORY)
    assert_loaded(load_model(tmp_path / "ckpt.pt", factory=FACTORY, trust=True), weights, "state_dict")


def test_the_report_and_the_console_say_what_was_picked(tmp_path, monkeypatch, weights):
    monkeypatch.chdir(tmp_path)
    torch.save({"epoch": 3, "state_dict": prefixed(weights, "model.")}, "ckpt.pt")
    report = optimize_file(OptimizeOptions(input="ckpt.pt", output="out.pt", factory=FACTORY))
    assert report.status == "ok", report.error
    assert (report.input["state_dict_key"], report.input["stripped_prefix"]) == ("state_dict", "model.")
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["optimize", "ckpt.pt", "-o", "cli.pt", "--factory", FACTORY,
                                                            "--state-dict-key", "state_dict", "--strip-prefix", "model."])
    assert result.exit_code == 0, result.output
    assert "weights: the 'state_dict' entry of ckpt.pt, keys without the prefix 'model.'" in result.stdout


def test_batch_jobs_take_the_same_keys(tmp_path):
    (tmp_path / "jobs.yaml").write_text(
        "jobs:\n  - input: ckpt.pt\n    output: out.pt\n    factory: models:build_tagger\n"
        "    state_dict_key: ema\n    strip_prefix: module.\n")
    (job,) = load_config(tmp_path / "jobs.yaml").jobs
    assert (job.options.state_dict_key, job.options.strip_prefix) == ("ema", "module.")

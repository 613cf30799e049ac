"""One source of truth for the InherConfig options: every field is a `--inher_*` flag of the recipes and an option of
`inhernet compress`, generated from the dataclass (type, choices, help), and the flags build the same config."""

import argparse
import dataclasses
import json

import pytest

from inhernet_hf import InherConfig
from inhernet_hf.cli import build_parser
from inhernet_hf.flags import RECIPE_SET_FIELDS, add_inher_args, config_from_flags, inher_config_from_args

FIELDS = [f.name for f in dataclasses.fields(InherConfig)]


def _recipe_parser():
    return add_inher_args(argparse.ArgumentParser())


def _compress_parser():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["compress"]


def test_every_config_field_has_a_recipe_flag_and_a_cli_option():
    recipe = {a.dest: a for a in _recipe_parser()._actions}
    cli = {a.dest: a for a in _compress_parser()._actions}
    assert RECIPE_SET_FIELDS == ("task_type",)  # the recipes set the task type from their model head
    for f in dataclasses.fields(InherConfig):
        assert f.name in cli and f.metadata["help"] in cli[f.name].help, f.name
        if f.name not in RECIPE_SET_FIELDS:
            assert f"inher_{f.name}" in recipe and f.metadata["help"] in recipe[f"inher_{f.name}"].help, f.name
    assert recipe["inher_init"].choices == ("svd", "svd_lowrank", "whitened", "random")
    assert cli["gate_input"].choices == ("latent", "input")


def test_recipe_flags_build_the_config():
    args = _recipe_parser().parse_args([
        "--inher_target_ratio", "0.4", "--inher_num_heads", "3", "--inher_target_modules", "query", "value",
        "--inher_layers_to_transform", "1", "2", "--inher_exclude_modules", r".*\.0\..*",
        "--inher_rank_pattern", json.dumps({"value": 8}), "--inher_head_init", "demo", "--inher_gate_input", "input",
        "--inher_calibration_damping", "0.01"])
    config = inher_config_from_args(args, "SEQ_CLS")
    assert config == InherConfig(target_ratio=0.4, num_heads=3, target_modules=["query", "value"],
                                 layers_to_transform=[1, 2], exclude_modules=r".*\.0\..*", rank_pattern={"value": 8},
                                 head_init="demo", gate_input="input", calibration_damping=0.01, init="whitened",
                                 rank_allocation="activation", task_type="SEQ_CLS")


def test_cli_options_build_the_config():
    args = _compress_parser().parse_args([
        "m", "--r", "8", "--num-heads", "1", "--target-modules", "all-linear", "--modules-to-save", "classifier",
        "--gate", "none", "--structure", "symmetric", "--svd-niter", "2", "--task-type", "SEQ_CLS"])
    assert config_from_flags(args, "cli") == InherConfig(
        r=8, num_heads=1, target_modules="all-linear", modules_to_save=["classifier"], gate="none",
        structure="symmetric", svd_niter=2, task_type="SEQ_CLS")
    assert config_from_flags(_compress_parser().parse_args(["m", "--target-ratio", "0.5"]), "cli") == InherConfig(
        target_ratio=0.5)  # unset options take InherConfig's defaults


@pytest.mark.parametrize("value", ["[1, 2]", "not json"])
def test_rank_pattern_must_be_a_json_object(value, capsys):
    with pytest.raises(SystemExit):
        _recipe_parser().parse_args(["--inher_rank_pattern", value])
    assert "expected a JSON object" in capsys.readouterr().err

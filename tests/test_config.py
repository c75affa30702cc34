"""One parser for every command (sft_hf/run/config.py): a YAML file's values are the parser's defaults, flags override
them, errors are one line naming the file or the flag, `--help` fits a screen; the default recipe ships in the package."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sft_hf.errors import RecipeError
from sft_hf.evaluation.cli import EVALUATE
from sft_hf.run.config import DEFAULT_RECIPE, TRAIN, parse_command, parse_recipe, parse_recipe_and_values
from tiny_setup import ROOT


def write(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_file_values_are_defaults_that_flags_override(tmp_path):
    # YAML 1.1 reads 5e-5 (no dot) as text: argparse converts a default as it converts a flag's value
    recipe = write(tmp_path / "r.yaml", {"learning_rate": "5e-5", "max_steps": 7, "lora_target_modules": ["q_proj"],
                                         "column_mapping": {"q": "instruction"}, "output_dir": str(tmp_path / "o")})
    model, data, args = parse_recipe(["--config", recipe])
    assert (args.learning_rate, args.max_steps, model.lora_target_modules) == (5e-5, 7, ["q_proj"])
    assert data.column_mapping == {"q": "instruction"}
    _, _, args = parse_recipe([recipe, "--learning_rate", "0.25", "--max_steps=3"])
    assert (args.learning_rate, args.max_steps) == (0.25, 3)
    # a flag that makes a file key meaningless drops it: epochs given, the file's max_steps would override them
    _, _, args, values = parse_recipe_and_values(["--config", recipe, "--num_train_epochs", "2"])
    assert (args.num_train_epochs, args.max_steps) == (2, -1) and "max_steps" not in values


def test_errors_name_the_file_or_the_command_line(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"learning_rate": "fast", "output_dir": str(tmp_path)})
    with pytest.raises(RecipeError, match=rf"^{recipe}: argument --learning_rate: invalid float value: 'fast'$"):
        parse_recipe(["--config", recipe])
    with pytest.raises(RecipeError, match=r"^command line: argument --seed: invalid int value: 'x'$"):
        parse_recipe(["--config", recipe, "--learning_rate", "1", "--seed", "x"])
    typo = write(tmp_path / "typo.yaml", {"lerning_rate": 1})
    with pytest.raises(RecipeError, match=rf"^{typo}: unknown key 'lerning_rate'; did you mean 'learning_rate'\?$"):
        parse_recipe(["--config", typo])
    with pytest.raises(RecipeError, match=r"^command line: unknown option --max_lenght; did you mean --max_length\?$"):
        parse_recipe(["--max_lenght", "5"])
    with pytest.raises(RecipeError, match=r"^command line: --config needs a recipe file$"):
        parse_recipe(["--config"])


def test_help_fits_a_screen_and_names_every_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_recipe(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert len(lines) <= 40 and max(map(len, lines)) <= 120
    for key in ("model_name_or_path", "dataset_name", "template", "packing", "padding_free", "precision",
                "learning_rate", "output_dir", "per_device_train_batch_size"):
        assert f" {key}," in text or f" {key}\n" in text or f", {key}" in text, key
    assert "adam_beta1" not in text  # TrainingArguments beyond the common ones: --help_all
    with pytest.raises(SystemExit):
        parse_recipe(["--help", "packing"])
    assert "best-fit decreasing" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_recipe(["--help_all"])
    assert "--adam_beta1" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="--help pakcing: no such key; did you mean 'packing'"):
        parse_recipe(["--help", "pakcing"])


def test_every_command_parses_alike(tmp_path):
    # evaluate takes a YAML file too, with the same rules
    config = write(tmp_path / "eval.yaml", {"responses": "r.json", "judge_concurrency": "2"})
    args, values = parse_command(EVALUATE, ["--config", config, "--max_samples", "5"])
    assert (args.responses, args.judge_concurrency, args.max_samples) == ("r.json", 2, 5)
    assert values == {"responses": "r.json", "judge_concurrency": 2, "max_samples": 5}
    with pytest.raises(RecipeError, match="unknown option --judge_backnd; did you mean --judge_backend"):
        parse_command(EVALUATE, ["--judge_backnd", "hf"])
    from sft_hf.lora import MergeArguments
    from sft_hf.run.config import Command

    merge = Command(prog="merge", dataclass_types=(MergeArguments,), positional=("adapter_dir", "out_dir"), summary="")
    args, _ = parse_command(merge, ["a", "b", "--dtype", "bfloat16", "--overwrite"])
    assert (args.adapter_dir, args.out_dir, args.dtype, args.overwrite) == ("a", "b", "bfloat16", True)
    with pytest.raises(RecipeError, match="the following arguments are required: --adapter_dir"):
        parse_command(merge, [])


def test_the_default_recipe_ships_in_the_package():
    assert DEFAULT_RECIPE.is_relative_to(ROOT / "sft_hf") and DEFAULT_RECIPE.is_file()
    assert (ROOT / "recipes" / "default.yaml").resolve() == DEFAULT_RECIPE  # the checkout shows it among the recipes
    values = parse_recipe_and_values([])[3]
    assert values["output_dir"] == "outputs/default" and values["max_steps"] == 1000
    assert TRAIN.prog == "sft-hf train"


def test_a_wheel_install_trains_the_default_recipe_without_a_checkout(tmp_path):
    """`pip install` of the built wheel (not editable), run from a folder with no checkout: `sft-hf train` finds the
    default recipe inside the package."""
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(wheel_dir.glob("sft_hf-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1", SFT_HF_ALLOCATOR="system")
    run = tmp_path / "elsewhere"
    run.mkdir()
    probe = ("import sys, sft_hf; from sft_hf.cli import main; print('package', sft_hf.__file__); "
             "sys.exit(main(['train', '--max_steps', '3', '--max_train_samples', '64', '--eval_strategy', 'no', "
             "'--eval_exact_match', 'false', '--logging_steps', '1']))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=run, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"package {site}" in result.stdout
    assert (run / "outputs" / "default" / "model.safetensors").is_file()
    assert yaml.safe_load((run / "outputs" / "default" / "recipe.yaml").read_text())["max_steps"] == 3

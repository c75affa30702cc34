"""The recipe (sft_hf/run/config.py) and the parser every command shares (sft_hf/run/parser.py): a YAML file's values
are the parser's defaults, flags override them, errors are one line naming the file or the flag, `--help` fits a
screen; a run without a recipe is the default recipe (shipped in the package) unless it names a model or data."""
import os
import shutil
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
    wheel_dir, site, source = tmp_path / "wheel", tmp_path / "site", tmp_path / "source"
    source.mkdir()  # the wheel is built from a copy: the build leaves nothing in the checkout
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "sft_hf", source / "sft_hf", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(source)], check=True, capture_output=True, timeout=300)
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


def test_unknown_recipe_key_suggests_the_closest(tmp_path):
    with pytest.raises(RecipeError, match="command line: unknown option --learning_rte; did you mean --learning_rate"):
        parse_recipe(["--learning_rte", "1e-4"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_lenght: 64\n")
    with pytest.raises(RecipeError, match=rf"{recipe}: unknown key 'max_lenght'; did you mean 'max_length'"):
        parse_recipe(["--config", str(recipe)])
    recipe.write_text("max_length: [1\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        parse_recipe(["--config", str(recipe)])
    with pytest.raises(RecipeError, match="column_mapping is not valid JSON"):
        parse_recipe(["--column_mapping", "{question: instruction}"])
    _, data_args, _ = parse_recipe(["--column_mapping", '{"question": "instruction"}', "--skip_bad_records", "true"])
    assert data_args.column_mapping == {"question": "instruction"} and data_args.skip_bad_records is True


def test_dataset_without_a_model_is_an_error_not_the_toy_model():
    with pytest.raises(RecipeError, match="--dataset_name without --model_name_or_path"):
        parse_recipe(["--dataset_name", "data.json"])
    model_args, data_args, _ = parse_recipe(["--dataset_name", "data.json", "--model_name_or_path", "builtin:tiny-llama"])
    assert (model_args.model_name_or_path, data_args.dataset_name) == ("builtin:tiny-llama", "data.json")


def test_recipe_values_of_the_wrong_type_name_their_source_in_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: builtin:tiny-llama\nlearning_rate: abc\n")
    with pytest.raises(RecipeError, match=rf"^{recipe}: argument --learning_rate: invalid float value"):
        parse_recipe(["--config", str(recipe)])
    with pytest.raises(RecipeError, match=r"^command line: argument --learning_rate: invalid float"):
        parse_recipe(["--config", str(recipe), "--learning_rate", "x"])
    # the command line's value wins without the file's being parsed; --config=path works like --config path
    assert parse_recipe([f"--config={recipe}", "--learning_rate", "0.001"])[2].learning_rate == 0.001
    with pytest.raises(RecipeError, match="^command line: per_device_train_batch_size must be at least 1, got 0"):
        parse_recipe(["--config", str(recipe), "--learning_rate", "1", "--per_device_train_batch_size", "0"])
    with pytest.raises(RecipeError, match="^command line: max_train_samples must be at least 1, got -5"):
        parse_recipe(["--config", str(recipe), "--learning_rate", "1", "--max_train_samples", "-5"])
    with pytest.raises(RecipeError, match="^command line: shuffle_seed must be at least 0, got -3"):
        parse_recipe(["--config", str(recipe), "--learning_rate", "1", "--shuffle_seed", "-3"])


def test_a_recipe_given_first_without_config_and_a_stray_value(tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("model_name_or_path: builtin:tiny-llama\nlearning_rate: 0.002\nmax_length: 48\n")
    _, _, args = parse_recipe([str(recipe), "--learning_rate", "0.003"])  # alignment-handbook's form
    assert (args.learning_rate, args.max_length) == (0.003, 48)
    with pytest.raises(RecipeError, match=r"^command line: unexpected 'oops': values follow their --flag"):
        parse_recipe(["--config", str(recipe), "oops"])
    with pytest.raises(RecipeError, match=r"^command line: unexpected '0.2'"):
        parse_recipe(["--config", str(recipe), "--learning_rate", "0.1", "0.2"])


def test_a_run_without_config_that_names_model_or_data_starts_from_trainingarguments_defaults(tiny):
    model_args, data_args, args, recipe = parse_recipe_and_values(
        ["--model_name_or_path", tiny["model"], "--dataset_name", tiny["data"], "--num_train_epochs", "1"])
    # TrainingArguments' / TRL's defaults, not recipes/default.yaml's toy choices
    assert (args.max_steps, args.num_train_epochs, args.learning_rate) == (-1, 1.0, 5e-5)
    assert (args.lr_scheduler_type.value, args.warmup_steps, args.per_device_train_batch_size) == ("linear", 0, 8)
    assert (args.eval_strategy.value, args.eval_exact_match, args.completion_only_loss) == ("no", False, False)
    assert (args.max_length, args.output_dir) == (1024, "trainer_output")
    assert recipe == {"model_name_or_path": tiny["model"], "dataset_name": tiny["data"], "num_train_epochs": 1.0}


def test_plain_run_is_the_default_recipe_and_the_command_line_beats_the_file():
    default = yaml.safe_load(DEFAULT_RECIPE.read_text())
    _, data_args, args = parse_recipe([])
    assert args.max_steps == default["max_steps"] == 1000 and data_args.dataset_name == "builtin:toy-tasks"
    _, _, args = parse_recipe(["--max_steps", "800"])  # any key overrides; the rest is still the default recipe
    assert args.max_steps == 800 and args.learning_rate == default["learning_rate"]
    # the file's max_steps would silently override --num_train_epochs: the command line wins
    _, _, args = parse_recipe(["--config", str(DEFAULT_RECIPE), "--num_train_epochs", "2"])
    assert (args.max_steps, args.num_train_epochs) == (-1, 2.0)
    assert args.learning_rate == default["learning_rate"]  # other file keys stay
    _, _, args = parse_recipe(["--config", str(ROOT / "recipes" / "smollm2-135m-alpaca.yaml"), "--max_steps", "5"])
    assert (args.max_steps, args.num_train_epochs) == (5, 2.0)  # max_steps > 0 is TrainingArguments' own override

"""`sft-hf` console script (also `python -m sft_hf`): `sft-hf <command> [options] [recipe arguments]`.

Each command is a `main(argv)` in the module that implements it, imported only when it runs, so adding one is one
line in COMMANDS. Every command parses its options the same way (sft_hf/run/config.py: dataclasses, a YAML file's
values as defaults, one-line errors).
"""
import importlib
import sys

TRAINS = {"train"}  # commands that train: re-run once on the faster allocator before torch is imported
COMMANDS = {
    "train": ("sft_hf.train", "fine-tune a model on a recipe (the same as accelerate launch recipes/train.py)"),
    "evaluate": ("sft_hf.evaluation.cli", "generate and score responses: exact match, ROUGE, LLM judge, multiple "
                                          "choice"),
    "inspect": ("sft_hf.inspection.examples", "show the first N examples token by token, as the collator feeds them"),
    "report": ("sft_hf.inspection.report", "dataset report: lengths, truncation, padding, trained tokens, duplicates"),
    "merge-lora": ("sft_hf.lora", "fold a LoRA adapter into its base model and save a full model"),
    "arena": ("sft_hf.evaluation.arena.cli", "blind votes between two answers in the browser, Bradley-Terry ratings"),
    "launch": ("sft_hf.run.launch", "accelerate launch, ending a failed run with the script's error and exit code"),
}


def usage() -> str:
    lines = ["usage: sft-hf <command> [options] [recipe arguments: --config x.yaml, --dataset_name ..., ...]", ""]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`sft-hf <command> --help` lists a command's own options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    if argv[0] not in COMMANDS:
        print(f"sft-hf: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if argv[0] in TRAINS:
        from sft_hf.speed import allocator

        allocator.use_fast_allocator()
    module = importlib.import_module(COMMANDS[argv[0]][0])
    from sft_hf.errors import run_cli

    return run_cli(module.main, argv[1:])  # bad data, template, recipe or folder: one line on stderr, exit code 2


if __name__ == "__main__":
    sys.exit(main())

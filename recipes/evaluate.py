"""Evaluate an instruction-tuned model the three ways chapter 7 does, in one command.

    # generate for the test split with a trained model, then reference metrics and an Ollama Llama 3 judge
    python recipes/evaluate.py --model outputs/run --dataset_name data.json --judge_backend ollama --judge_model llama3
    # judge responses someone else generated, with any OpenAI-compatible server (key from $OPENAI_API_KEY)
    python recipes/evaluate.py --responses responses.json --judge_backend openai \
        --judge_url http://localhost:8000/v1 --judge_model my-judge
    # two response columns side by side; MMLU-format multiple choice from a local file
    python recipes/evaluate.py --responses eval.json --response_keys "model 1 response" "model 2 response" ...
    # pairwise: is the fine-tune better than the base model? Each pair judged in both orders, win rates
    python recipes/evaluate.py --responses run/test_responses.json --compare_with base/test_responses.json ...
    python recipes/evaluate.py --responses eval.json --pairwise_keys "model 1 response" "model 2 response" ...
    python recipes/evaluate.py --model outputs/run --mc_task_file mmlu-mini.jsonl

Generation runs on every process under `accelerate launch` (the test split is sharded); everything after it runs
on the main process. Writes into --output_dir: test_responses.json (chapter 7's shape: each record plus
`model_response`), metrics.json, judge_scores_*.json, judge_histogram.png, judge_summary.json, mc_results.json;
pairwise: pairwise_verdicts.json, pairwise_summary.json, pairwise_win_rate.png (and pairwise_cache.jsonl).
"""
import json
import logging
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import HfArgumentParser

# `python recipes/evaluate.py` puts recipes/ first on sys.path, where this file would shadow the `evaluate` library.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from sft_hf.errors import Interrupted, RecipeError, did_you_mean  # noqa: E402
from sft_hf.evaluation.responses import RESPONSES_FILE, default_name, read_responses  # noqa: E402
from sft_hf.run.outputs import load_template  # noqa: E402

logger = logging.getLogger("sft_hf")


@dataclass
class EvalArguments:
    model: str | None = field(default=None, metadata={"help": "Trained model folder (or Hub id, builtin:tiny-llama)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset to take --split from, as in training."})
    dataset_config: str | None = None
    column_mapping: str | None = field(default=None, metadata={"help": "JSON renaming fields, as in training."})
    split: str = field(default="test", metadata={"help": "train, validation or test."})
    train_split_ratio: float = 0.85
    test_split_ratio: float = 0.10
    shuffle_seed: int | None = None
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N records."})
    template: str | None = field(default=None, metadata={"help": "Default: the model's sft_template.json or alpaca."})
    max_new_tokens: int = 256
    batch_size: int | None = field(default=None, metadata={
        "help": "Rows generated at once (default: by memory, at most 64); multiple-choice batch (default 8)."})
    responses: str | None = field(default=None, metadata={"help": "A JSON list of records with response fields."})
    response_keys: list[str] = field(default_factory=lambda: ["model_response"],
                                     metadata={"help": "Response fields to score; two or more are compared."})
    compare_with: str | None = field(default=None, metadata={
        "help": "Pairwise: a second responses file (e.g. the base model's test_responses.json) judged against "
                "--responses (or the generated responses), pair by pair, joined by instruction + input."})
    compare_key: str | None = field(default=None, metadata={
        "help": "Pairwise: the response field of --compare_with (default: the one of --response_keys)."})
    pairwise_keys: list[str] | None = field(default=None, metadata={
        "help": "Pairwise: two response fields of --responses, e.g. 'model 1 response' 'model 2 response'."})
    pairwise_names: list[str] | None = field(default=None, metadata={
        "help": "Pairwise: names of the two sides in the report (default: the files' or the fields' names)."})
    pairwise_bootstrap: int = field(default=1000, metadata={"help": "Pairwise: resamples, 95%% intervals."})
    output_dir: str | None = field(default=None, metadata={"help": "Default: <model>/evaluation, outputs/evaluation."})
    metrics: bool = field(default=True, metadata={"help": "Exact match and ROUGE against `output`."})
    judge_backend: str | None = field(default=None, metadata={"help": "ollama, openai or hf (default: no judge)."})
    judge_url: str | None = field(default=None, metadata={"help": "Ollama: http://localhost:11434; OpenAI: .../v1."})
    judge_model: str | None = field(default=None, metadata={"help": "Ollama default llama3; a model folder for hf."})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Env var holding the API key."})
    judge_prompt: str | None = field(default=None, metadata={
        "help": "Prompt template (text or a file) with {input}, {output}, {response}; default chapter 7's. "
                "Pairwise: {question}, {reference}, {answer_a}, {answer_b}; default MT-bench's."})
    judge_stream: bool | None = field(default=None, metadata={
        "help": "Stream the reply (default: Ollama yes, NDJSON; OpenAI-compatible no)."})
    judge_format: str = field(default="auto", metadata={
        "choices": ["auto", "json", "text"],
        "help": "auto: JSON ({score: int}; pairwise {winner: A|B|tie}) where the server supports it, else the "
                "text prompt's answer; json; text."})
    judge_max_tokens: int | None = field(default=None, metadata={"help": "OpenAI-compatible: cap on reply tokens."})
    judge_concurrency: int = 4
    judge_retries: int = 4
    judge_backoff: float = 1.0
    mc_task_file: str | None = field(default=None, metadata={"help": "MMLU-format .json/.jsonl/.csv, run offline."})
    mc_tasks: list[str] | None = field(default=None, metadata={"help": "lm-eval task names, e.g. mmlu."})
    mc_base_model: str | None = field(default=None, metadata={
        "help": "Also run --mc_task_file on this model (the one fine-tuning started from): before and after."})
    mc_num_fewshot: int = 0
    mc_limit: int | None = field(default=None, metadata={"help": "At most this many questions per subject."})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "Torch CPU threads. Default: OMP_NUM_THREADS when the user set it, else all cores / local processes."})


def load_model_and_tokenizer(name_or_path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_hf.modeling import resolve_model_path

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if Path(path, "adapter_config.json").is_file():  # a LoRA run saved only its adapter
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype="auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True)
    if torch.cuda.is_available():
        from accelerate import PartialState

        model.to(PartialState().device)
    return model, tokenizer


def generate_split(args: EvalArguments, template) -> list[dict]:
    from accelerate import PartialState

    from sft_hf.data import load_instruction_dataset
    from sft_hf.evaluation.generation import distributed_on_cpu, generate_responses

    PartialState(cpu=distributed_on_cpu())  # first use decides: under torchrun without GPUs, one gloo group

    if not args.dataset_name:
        raise RecipeError("--model needs --dataset_name to generate responses for (or pass --responses)")
    mapping = json.loads(args.column_mapping) if args.column_mapping else None
    with PartialState().main_process_first():
        splits = load_instruction_dataset(args.dataset_name, args.dataset_config, mapping, args.train_split_ratio,
                                          args.test_split_ratio, args.shuffle_seed, template=template)
    records = splits[args.split].to_list()[: args.max_samples]
    if not records:
        raise RecipeError(f"{args.dataset_name}: the {args.split!r} split is empty")
    model, tokenizer = load_model_and_tokenizer(args.model)
    responses = generate_responses(model, tokenizer, records, template, args.max_new_tokens,
                                   batch_size=args.batch_size, distributed=True)
    if PartialState().is_main_process:
        print(f"Generated {len(records)} responses on {PartialState().num_processes} process(es)")
    return [{**r, "model_response": response} for r, response in zip(records, responses)]


def parse_args(argv=None) -> EvalArguments:
    args, unknown = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        flags = [f"--{f.name}" for f in fields(EvalArguments)]
        hint = did_you_mean(unknown[0].split("=")[0], flags) or "see python recipes/evaluate.py --help"
        raise RecipeError(f"unknown argument(s) {' '.join(unknown)}; {hint}")
    check_pairwise_args(args)
    if args.judge_backend is not None:  # checked before generating, which can take minutes
        from sft_hf.evaluation.judge import JUDGE_PROMPT_FIELDS, PAIRWISE_PROMPT_FIELDS, check_judge_settings, \
            check_prompt_fields

        try:
            check_judge_settings(args.judge_backend, args.judge_model)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        if args.judge_prompt and Path(args.judge_prompt).is_file():
            args.judge_prompt = Path(args.judge_prompt).read_text()
        if args.judge_prompt:
            pairwise = bool(args.compare_with or args.pairwise_keys)
            check_prompt_fields(args.judge_prompt, PAIRWISE_PROMPT_FIELDS if pairwise else JUDGE_PROMPT_FIELDS)
    return args


def check_pairwise_args(args: EvalArguments) -> None:
    """The pairwise flags fit together (checked before generating, too)."""
    for flag in ("pairwise_keys", "pairwise_names"):
        if getattr(args, flag) is not None and len(getattr(args, flag)) != 2:
            raise RecipeError(f"--{flag} takes two values (the model's, then the baseline's), got "
                              f"{len(getattr(args, flag))}: {getattr(args, flag)}")
    if not (args.compare_with or args.pairwise_keys):
        if args.pairwise_names or args.compare_key:
            raise RecipeError("--pairwise_names and --compare_key go with --compare_with or --pairwise_keys")
        return
    if args.compare_with and args.pairwise_keys:
        raise RecipeError("pass --compare_with (two files) or --pairwise_keys (two fields of one file), not both")
    if args.pairwise_keys and not args.responses:
        raise RecipeError("--pairwise_keys names two fields of --responses: pass --responses file.json")
    if not args.judge_backend:
        raise RecipeError("a pairwise comparison needs a judge: add --judge_backend (ollama, openai or hf)")
    if args.compare_with and len(args.response_keys) != 1:
        raise RecipeError(f"--compare_with compares one response field, --response_keys has {len(args.response_keys)}")
    if args.compare_with and not Path(args.compare_with).is_file():
        raise RecipeError(f"--compare_with {args.compare_with}: no such file")
    if args.pairwise_names and args.pairwise_names[0] == args.pairwise_names[1]:
        raise RecipeError(f"--pairwise_names: the two sides need different names, got {args.pairwise_names[0]!r} twice")
    if args.pairwise_bootstrap < 0:
        raise RecipeError(f"--pairwise_bootstrap {args.pairwise_bootstrap}: use 0 (no intervals) or more")


def side_names(args: EvalArguments, model_file: str) -> list[str]:
    """The two sides' names: --pairwise_names, else the fields, else the files' names as the arena gives them (a
    test_responses.json: its run folder), their paths if those are the same."""
    if args.pairwise_names:
        return args.pairwise_names
    if args.pairwise_keys:
        return args.pairwise_keys
    names = [Path(args.model).name if not args.responses else default_name(model_file),
             default_name(args.compare_with)]
    return names if names[0] != names[1] else [model_file, args.compare_with]


def make_pairs(args: EvalArguments, records: list[dict], model_file: str) -> tuple[list, list[str]]:
    """The pairs to judge, at most --max_samples of them, and the names of the two sides."""
    from sft_hf.evaluation.judge import join_responses, pairs_from_columns

    if args.pairwise_keys:
        pairs = pairs_from_columns(records, *args.pairwise_keys)
    else:
        model_key = args.response_keys[0]
        baseline_key = args.compare_key or model_key
        baseline = read_responses(args.compare_with, [baseline_key], flag="--compare_with", reference=True)
        pairs = join_responses(records, baseline, model_key, baseline_key, model_file, args.compare_with)
    return pairs[: args.max_samples], side_names(args, model_file)


def interrupted_judge_message(output_dir: Path) -> str:
    """What Ctrl-C during judging leaves: the cache files a rerun resumes from."""
    from sft_hf.evaluation.judge import PAIRWISE_CACHE

    caches = sorted([*output_dir.glob("judge_cache_*.jsonl"), *output_dir.glob(PAIRWISE_CACHE)])
    kept = ", ".join(str(p) for p in caches) or "no cache yet"
    return f"interrupted: the judge's answers so far are kept in {kept}; run the same command again to resume"


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.model or args.judge_backend == "hf":  # a model runs here (else torch is not even imported)
        from sft_hf.speed.threads import set_cpu_threads

        set_cpu_threads(args.cpu_threads)  # every core unless the user chose (accelerate launch would give 1)
    if not args.model and not args.responses:
        raise RecipeError("pass --model (with --dataset_name) to generate responses, or --responses file.json")
    output_dir = Path(args.output_dir or (Path(args.model, "evaluation") if args.model and Path(args.model).is_dir()
                                          else "outputs/evaluation"))
    template = load_template(args.model, args.template)
    report = {}

    # 1. Responses: read them, or generate them (on every process under accelerate launch).
    if args.pairwise_keys:
        args.response_keys = args.pairwise_keys  # the two fields are the ones to read and to score
    if args.responses:
        records = read_responses(args.responses, args.response_keys, flag="--responses", reference=True)
    elif args.dataset_name:
        from accelerate import PartialState

        records = generate_split(args, template)
        args.response_keys = ["model_response"]
        state = PartialState()
        if state.num_processes > 1:  # leave the group together: gloo can abort at exit otherwise (pytorch#190489)
            state.wait_for_everyone()
            state.destroy_process_group()
        if not state.is_main_process:
            return None
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RESPONSES_FILE).write_text(json.dumps(records, indent=2) + "\n")
        print(f"Saved {len(records)} responses to {output_dir / RESPONSES_FILE}")
    else:
        records = []
    output_dir.mkdir(parents=True, exist_ok=True)
    pairs = names = None
    if records and (args.compare_with or args.pairwise_keys):  # joined before --max_samples: the files' orders may differ
        pairs, names = make_pairs(args, records, args.responses or str(output_dir / RESPONSES_FILE))
    records = records[: args.max_samples]

    # 2. Reference metrics.
    if records and args.metrics:
        from sft_hf.evaluation.metrics import evaluate_responses, reference_metrics

        if pairs is not None:  # both sides of every pair against the model side's reference
            from sft_hf.evaluation.judge.pairwise import reference_of

            references = [reference_of(p.record) for p in pairs]
            report["metrics"] = {names[0]: reference_metrics([p.model_response for p in pairs], references),
                                 names[1]: reference_metrics([p.baseline_response for p in pairs], references)}
        else:
            report["metrics"] = {key: evaluate_responses(records, key) for key in args.response_keys}
        for key, values in report["metrics"].items():
            print(f"{key}: " + ", ".join(f"{name} {value:.4f}" for name, value in values.items()))
        (output_dir / "metrics.json").write_text(json.dumps(report["metrics"], indent=2) + "\n")

    # 3. LLM judge: a 0-100 score per response, or, with two sides, a verdict per pair in both orders.
    if records and args.judge_backend:
        from sft_hf.evaluation.judge import JUDGE_PROMPT, make_judge, run_judge, run_pairwise

        prompt = args.judge_prompt  # a file's text by now (parse_args)
        judge = make_judge(args.judge_backend, args.judge_model, args.judge_url, args.judge_api_key_env,
                           args.judge_stream, args.judge_max_tokens)
        try:
            if pairs is not None:
                summary = run_pairwise(pairs, judge, output_dir, names[0], names[1], args.judge_format,
                                       args.judge_concurrency, args.judge_retries, args.judge_backoff,
                                       bootstrap_samples=args.pairwise_bootstrap, prompt_template=prompt)
                report["pairwise"] = {k: v for k, v in summary.items() if k != "undecided"}
            else:
                summaries = run_judge(records, judge, args.response_keys, output_dir, prompt or JUDGE_PROMPT,
                                      args.judge_concurrency, args.judge_retries, args.judge_backoff,
                                      judge_format=args.judge_format)
                report["judge"] = {k: {n: v for n, v in s.items() if n != "unscored"} for k, s in summaries.items()}
        except KeyboardInterrupt:  # an unreachable judge is a UserError: run_cli prints both as one line
            raise Interrupted(interrupted_judge_message(output_dir)) from None

    # 4. Multiple-choice benchmarks (lm-evaluation-harness).
    if args.model and (args.mc_task_file or args.mc_tasks):
        from sft_hf.evaluation.multiple_choice import format_mc_comparison, format_mc_results, run_benchmarks, run_local_mc
        from sft_hf.modeling import resolve_model_path

        model_path = resolve_model_path(args.model)
        mc_batch_size = args.batch_size or 8
        if args.mc_task_file:
            report["mc"] = run_local_mc(model_path, args.mc_task_file, args.mc_num_fewshot, mc_batch_size,
                                        args.mc_limit)
            print("\n" + format_mc_results(report["mc"]))
            if args.mc_base_model:
                report["mc_base"] = run_local_mc(resolve_model_path(args.mc_base_model), args.mc_task_file,
                                                 args.mc_num_fewshot, mc_batch_size, args.mc_limit)
                print("\n" + format_mc_comparison({"before": report["mc_base"], "after": report["mc"]}))
        if args.mc_tasks:
            report["mc_tasks"] = run_benchmarks(model_path, args.mc_tasks, args.mc_num_fewshot, mc_batch_size,
                                                args.mc_limit)
            for task, result in report["mc_tasks"].items():
                print(f"{result['alias']}: accuracy {result['acc']:.4f}")
        (output_dir / "mc_results.json").write_text(json.dumps({k: v for k, v in report.items()
                                                                if k.startswith("mc")}, indent=2) + "\n")
    (output_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nWrote the evaluation to {output_dir}")
    return report


if __name__ == "__main__":
    from sft_hf.errors import run_cli

    sys.exit(run_cli(main))  # bad arguments, data, responses file or judge: one line, exit code 2 (Ctrl-C: 130)

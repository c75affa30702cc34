"""Publish a finished run: model or LoRA adapter, tokenizer, template and a model card with Hub metadata.

The push happens once, at the end, through `huggingface_hub` (not from Trainer at start-up and every checkpoint).
The token comes from `hf auth login` / `HF_TOKEN` (or `--hub_token`, which recipes/train.py keeps out of the saved
training arguments); it is never written to the card, the logs or any file. Offline or unauthenticated, the push
fails with a `HubPushError` saying why and how to upload later; the local save is left as it is.
"""
from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants, get_token

from sft_hf.templates import ChatTemplate, Template, get_template

logger = logging.getLogger(__name__)

# What a run leaves in output_dir that does not belong on the Hub: resumable checkpoints, the pickled training
# arguments (pickle is unsafe to load), temp files and the held-out generations.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "training_args.bin", "*.tmp", "runs/**"]
CARD_HYPERPARAMETERS = (
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "seed", "max_length",
    "completion_only_loss", "padding_free", "train_sampling_strategy",
)
LORA_HYPERPARAMETERS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


class HubPushError(RuntimeError):
    pass


def _is_hub_id(name: str | None) -> bool:
    """A Hub repo id (`org/name` or `name`), not a local path or a builtin: name."""
    return (bool(name) and not name.startswith(("builtin:", "package:")) and not name.endswith(".gguf")
            and not Path(name).exists() and name.count("/") <= 1)


def base_model_license(name: str | None) -> str | None:
    """The base model's license from its model card (a local folder's README.md, or one in the Hub cache); None when
    unknown: no license is better than a wrong one (a Llama or Gemma base is not Apache-2.0)."""
    card = Path(name or "", "README.md")
    if not card.is_file() and _is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "README.md")
        card = Path(cached) if isinstance(cached, str) else card
    try:
        return ModelCard.load(card).data.to_dict().get("license") if card.is_file() else None
    except Exception:  # noqa: BLE001 - a card without valid metadata
        return None


def build_model_card(output_dir: str, repo_id: str | None, model_args, data_args, train_args,
                     template: Template | str, metrics: dict | None = None, recipe: dict | None = None) -> ModelCard:
    """The run's one model card: output_dir/README.md (`repo_id=None`) and the card pushed to `repo_id`.

    Hub metadata checked by `ModelCardData` (base model and datasets only when they are Hub ids, license, tags,
    template, hyperparameters, evaluation results), then a body: the prompt template, how to load the model (or the
    LoRA adapter), the hyperparameters, the results and the effective recipe (recipe.yaml, secrets left out)."""
    template = get_template(template) if isinstance(template, str) else template
    where = repo_id or output_dir  # what `from_pretrained` / `pipeline` should be given
    name = (repo_id or Path(output_dir).name).split("/")[-1]
    is_adapter = Path(output_dir, "adapter_config.json").is_file()
    hyperparameters = {k: getattr(train_args, k) for k in CARD_HYPERPARAMETERS if hasattr(train_args, k)}
    if hyperparameters.get("max_steps", -1) > 0:  # max_steps overrides the epochs: listing both would mislead
        hyperparameters.pop("num_train_epochs", None)
    if model_args.use_peft:
        hyperparameters.update({k: getattr(model_args, k) for k in LORA_HYPERPARAMETERS})
    hyperparameters = {k: v.value if isinstance(v, Enum) else v for k, v in hyperparameters.items()}  # plain YAML
    sources = (metrics or {}).get("sources") or []  # a mixture's (sft_hf/mixture.py), with what each gave the run
    mixture = bool(getattr(data_args, "dataset_mixture", None))
    dataset = data_args.dataset_name if _is_hub_id(data_args.dataset_name) and not mixture else None
    paths = [s["path"] for s in sources] if mixture else [dataset] if dataset else []
    hub_datasets = list(dict.fromkeys(path for path in paths if _is_hub_id(path)))  # the card's `datasets:`
    metrics = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    eval_results = [
        EvalResult(task_type="text-generation", dataset_type=dataset or "local", dataset_name=data_args.dataset_name
                   if dataset else Path(data_args.dataset_name).name, dataset_split=split, metric_type=metric,
                   metric_value=round(float(value), 6))
        for metric, split in (("eval_loss", "validation"), ("eval_exact_match", "test"),
                              ("baseline_exact_match", "test"))
        if (value := metrics.get(metric)) is not None
    ]
    data = ModelCardData(
        model_name=name,
        base_model=model_args.model_name_or_path if _is_hub_id(model_args.model_name_or_path) else None,
        datasets=hub_datasets or None,
        license=base_model_license(model_args.model_name_or_path),
        library_name="peft" if is_adapter else "transformers",
        pipeline_tag="text-generation",
        tags=["sft-hf", "sft", "instruction-tuning", f"template:{template.name}"] + (["lora", "peft"] if is_adapter
                                                                                     else []),
        eval_results=eval_results or None,
        sft_template=template.name,
        hyperparameters=hyperparameters,
    )
    usage = ["from transformers import pipeline", f'generate = pipeline("text-generation", model="{where}")']
    if is_adapter:  # the pipeline loads the adapter through peft; or, as a model:
        usage += ["", "from peft import AutoPeftModelForCausalLM",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")',
                  "model = model.merge_and_unload()  # optional: a plain transformers model"]
    trained_on = f"a mixture of {len(sources)} sources" if mixture else f"`{data_args.dataset_name}`"
    body = [
        f"# {name}", "",
        f"Instruction-tuned from `{model_args.model_name_or_path}` on {trained_on} with "
        "[sft-hf](https://pypi.org/project/sft-hf/).", "",
        f"## Prompt template: `{template.name}`", "", "```",
        "the tokenizer's own chat template (`chat_template` in the tokenizer files), every turn"
        if isinstance(template, ChatTemplate)  # rendering it needs the tokenizer
        else template.format_prompt({"instruction": "{instruction}", "input": "{input}"}) + "{output}<eos>", "```",
        "(saved as `sft_template.json`)" if template.multi_turn  # chat templates have no Alpaca `input` part
        else "(the `input` part only when the input is non-empty; saved as `sft_template.json`)", "",
        "## Usage", "", "```python", *usage, "```", "",
        *data_section(sources),
        "## Training hyperparameters", "", "| name | value |", "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in hyperparameters.items()], "",
        "## Results", "", "| metric | value |", "| --- | --- |",
        *[f"| {k} | {v:.4g} |" for k, v in metrics.items()], "",
    ]
    if recipe:
        body += ["## Recipe", "", "Every non-default setting of the run (`recipe.yaml`; re-run with "
                 "`accelerate launch recipes/train.py --config recipe.yaml`):", "", "```yaml",
                 yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).rstrip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body))


def data_section(sources: list[dict]) -> list[str]:
    """The card's table of sources: each share, the records taken, and the examples and tokens trained from it."""
    if not sources:
        return []
    lines = ["## Training data", "", "| source | share | records taken | of | examples trained | tokens trained |",
             "| --- | --- | --- | --- | --- | --- |"]
    for s in sources:
        available = f"{s['available']:,}" if s.get("available") else "stream"
        lines.append(f"| `{s['label']}` | {s['share']} | {s['taken']:,} | {available} | {s['examples_trained']:,} "
                     f"| {s['tokens_trained']:,} |")
    return lines + [""]


def cannot_push_reason(token: str | None = None) -> str | None:
    """Why a push cannot work from here (offline or no token), without touching the network; None if it may."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if (token or get_token()) is None:
        return "not logged in to the Hugging Face Hub (run `hf auth login` or set HF_TOKEN)"
    return None


def push_to_hub(output_dir: str, repo_id: str, card: ModelCard, private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload model fine-tuned with sft-hf") -> str:
    """Write `card` as output_dir/README.md, create the repo if needed and upload the folder; returns the commit
    URL. Raises `HubPushError` with the reason and the `hf upload` command for later; output_dir stays as it is."""
    card.save(Path(output_dir, "README.md"))
    later = f"The model stays saved in {output_dir}; upload it later with: hf upload {repo_id} {output_dir}"
    reason = cannot_push_reason(token)
    if reason is not None:
        raise HubPushError(f"cannot push to {repo_id}: {reason}. {later}")
    api = HfApi(token=token or get_token())
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message=commit_message,
                                   ignore_patterns=IGNORE_PATTERNS)
    except Exception as error:  # HfHubHTTPError (401, 403, ...), the HTTP client's connection errors, offline
        raise HubPushError(f"push to {repo_id} failed: {type(error).__name__}: {error}. {later}") from error
    url = getattr(commit, "commit_url", None) or str(commit)
    logger.info("pushed %s to %s", output_dir, url)
    return url

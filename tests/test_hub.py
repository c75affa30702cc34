"""Hub push: the model card's YAML metadata and content, the upload calls (stubbed at HfApi, and for real against
a loopback HTTP server), and the offline / unauthenticated failures that keep the local save."""
import http.server
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from huggingface_hub import ModelCard, constants

from sft_hf.run import hub
from tiny_setup import run_train, tiny_recipe_args, write_tiny_dataset, write_tiny_model

TOKEN = "hf_TESTsecretTOKEN0123456789"


def run_args(use_peft=False):
    model_args = SimpleNamespace(model_name_or_path="Qwen/Qwen2.5-0.5B", use_peft=use_peft, lora_r=16,
                                 lora_alpha=32, lora_dropout=0.05, lora_target_modules=None)
    data_args = SimpleNamespace(dataset_name="tatsu-lab/alpaca")
    train_args = SimpleNamespace(learning_rate=2e-4, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                 num_train_epochs=2, max_steps=-1, lr_scheduler_type="cosine", warmup_steps=10,
                                 weight_decay=0.0, max_grad_norm=1.0, seed=42, max_length=1024,
                                 completion_only_loss=True, padding_free=False, hub_token=TOKEN)
    return model_args, data_args, train_args


def fake_output_dir(folder: Path, adapter: bool) -> Path:
    folder.mkdir()
    (folder / ("adapter_model.safetensors" if adapter else "model.safetensors")).write_bytes(b"weights")
    if adapter:
        (folder / "adapter_config.json").write_text("{}")
    (folder / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# run\n\n"
                                      f'generate = pipeline("text-generation", model="{folder}")\n')
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"state")
    return folder


def test_model_card_license_is_the_base_models_and_max_steps_replaces_the_epochs(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: llama3.2\n---\n# a base model\n")
    model_args, data_args, train_args = run_args()
    model_args.model_name_or_path, train_args.max_steps = str(base), 40
    card = hub.build_model_card(str(fake_output_dir(tmp_path / "run", False)), None, model_args, data_args, train_args,
                                "chatml")
    meta = card.data.to_dict()
    assert meta["license"] == "llama3.2"
    assert meta["hyperparameters"]["max_steps"] == 40 and "num_train_epochs" not in meta["hyperparameters"]
    assert "the `input` part" not in card.text and "(saved as `sft_template.json`)" in card.text


@pytest.mark.parametrize("adapter", [False, True])
def test_model_card_metadata_and_content(tmp_path, adapter):
    out = fake_output_dir(tmp_path / "run", adapter)
    metrics = {"eval_loss": 0.6612, "eval_exact_match": 0.42, "baseline_exact_match": 0.0, "train_runtime": 12.5}
    card = hub.build_model_card(str(out), "me/qwen-alpaca", *run_args(use_peft=adapter), "alpaca", metrics)
    card.save(tmp_path / "card.md")

    loaded = ModelCard.load(tmp_path / "card.md")  # parses the YAML header the way the Hub does
    meta = loaded.data.to_dict()
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and meta["datasets"] == ["tatsu-lab/alpaca"]
    assert "license" not in meta and meta["pipeline_tag"] == "text-generation"  # the base's is unknown offline
    assert meta["library_name"] == ("peft" if adapter else "transformers")
    assert {"sft-hf", "template:alpaca"} <= set(meta["tags"]) and ("lora" in meta["tags"]) == adapter
    assert meta["sft_template"] == "alpaca"
    assert meta["hyperparameters"]["learning_rate"] == 2e-4 and meta["hyperparameters"]["max_length"] == 1024
    assert ("lora_alpha" in meta["hyperparameters"]) == adapter
    results = {r.metric_type: (r.metric_value, r.dataset_split) for r in loaded.data.eval_results}
    assert results == {"eval_loss": (0.6612, "validation"), "eval_exact_match": (0.42, "test"),
                       "baseline_exact_match": (0.0, "test")}
    header = yaml.safe_load(loaded.content.split("---")[1])
    assert header["model-index"][0]["name"] == "qwen-alpaca"
    assert 'model="me/qwen-alpaca"' in loaded.text and str(out) not in loaded.text
    assert ("AutoPeftModelForCausalLM" in loaded.text) == adapter
    assert TOKEN not in loaded.content


def test_the_local_card_is_the_hub_card_pointing_at_the_folder(tmp_path):
    out = fake_output_dir(tmp_path / "run", adapter=False)
    metrics = {"eval_loss": 0.5, "eval_exact_match": 0.25}
    local = hub.build_model_card(str(out), None, *run_args(), "alpaca", metrics)
    pushed = hub.build_model_card(str(out), "me/qwen-alpaca", *run_args(), "alpaca", metrics)
    assert f'pipeline("text-generation", model="{out}")' in local.text and "### Response:" in local.text
    assert local.text.replace(str(out), "me/qwen-alpaca").replace("# run\n", "# qwen-alpaca\n") == pushed.text
    local_meta, pushed_meta = local.data.to_dict(), pushed.data.to_dict()
    assert local_meta.pop("model-index")[0]["name"] == "run"  # the model-index entry is named after the model
    assert pushed_meta.pop("model-index")[0]["name"] == "qwen-alpaca"
    assert local_meta == pushed_meta and local_meta["hyperparameters"]["learning_rate"] == 2e-4


def test_local_paths_are_not_claimed_as_hub_ids(tmp_path):
    out = fake_output_dir(tmp_path / "run", adapter=False)
    model_args, data_args, train_args = run_args()
    model_args.model_name_or_path, data_args.dataset_name = str(tmp_path), "builtin:toy-tasks"
    meta = hub.build_model_card(str(out), "me/x", model_args, data_args, train_args, "alpaca", {}).data.to_dict()
    assert "base_model" not in meta and "datasets" not in meta and "model-index" not in meta


def test_push_uploads_the_folder_with_card_and_without_checkpoints(tmp_path, monkeypatch):
    out = fake_output_dir(tmp_path / "run", adapter=True)
    card = hub.build_model_card(str(out), "me/qwen-alpaca", *run_args(use_peft=True), "alpaca", {"eval_loss": 1.0})
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", self.token, repo_id, kwargs))

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", self.token, kwargs["repo_id"], kwargs))
        assert Path(kwargs["folder_path"], "README.md").read_text() == str(card)  # the card is written first
        return SimpleNamespace(commit_url="https://huggingface.co/me/qwen-alpaca/commit/abc")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hub.HfApi, "upload_folder", upload_folder)
    url = hub.push_to_hub(str(out), "me/qwen-alpaca", card, private=True, token=TOKEN)
    assert url.endswith("/commit/abc")
    assert [c[:3] for c in calls] == [("create_repo", TOKEN, "me/qwen-alpaca"),
                                      ("upload_folder", TOKEN, "me/qwen-alpaca")]
    assert calls[0][3]["private"] is True and calls[0][3]["exist_ok"] is True
    upload = calls[1][3]
    assert upload["folder_path"] == str(out)
    assert {"checkpoint-*", "training_args.bin"} <= set(upload["ignore_patterns"])


class RejectingHub(http.server.BaseHTTPRequestHandler):
    """A loopback 'Hub' that answers every request with 401 and records what it was sent."""
    requests = []

    def _reject(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        RejectingHub.requests.append((self.command, self.path, self.headers.get("Authorization"), body))
        payload = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = _reject

    def log_message(self, *args):
        pass


def test_push_reaches_the_network_and_an_auth_failure_keeps_the_local_save(tmp_path, monkeypatch):
    out = fake_output_dir(tmp_path / "run", adapter=False)
    card = hub.build_model_card(str(out), "me/qwen-alpaca", *run_args(), "alpaca", {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RejectingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    RejectingHub.requests.clear()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        with pytest.raises(hub.HubPushError) as error:
            hub.push_to_hub(str(out), "me/qwen-alpaca", card, private=False, token=TOKEN)
    finally:
        server.shutdown()
    creates = [r for r in RejectingHub.requests if r[:2] == ("POST", "/api/repos/create")]
    assert len(creates) == 1
    _, _, authorization, body = creates[0]
    assert authorization == f"Bearer {TOKEN}"
    assert json.loads(body) == {"name": "qwen-alpaca", "organization": "me", "visibility": "public", "type": "model"}
    assert not any("upload" in r[1] or "commit" in r[1] for r in RejectingHub.requests)  # stopped at the 401
    message = str(error.value)
    assert "401" in message and "hf upload me/qwen-alpaca" in message and str(out) in message
    assert TOKEN not in message
    assert (out / "model.safetensors").read_bytes() == b"weights" and (out / "README.md").is_file()


def test_offline_and_unauthenticated_fail_clearly_before_any_request(tmp_path, monkeypatch):
    out = fake_output_dir(tmp_path / "run", adapter=False)
    card = hub.build_model_card(str(out), "me/m", *run_args(), "alpaca", {})

    def no_network(*args, **kwargs):
        raise AssertionError("no request may be made")

    monkeypatch.setattr(hub.HfApi, "create_repo", no_network)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubPushError, match="HF_HUB_OFFLINE is set.*hf upload me/m"):
        hub.push_to_hub(str(out), "me/m", card, token=TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(hub.HubPushError, match="not logged in.*hf auth login"):
        hub.push_to_hub(str(out), "me/m", card)
    assert (out / "model.safetensors").read_bytes() == b"weights"


def test_train_with_push_offline_keeps_the_save_and_never_writes_the_token(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    data = write_tiny_dataset(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    result = run_train(tiny_recipe_args(model, data, out, max_steps=2, push_to_hub="true",
                                        hub_model_id="me/tiny", hub_token=TOKEN), check=False)
    assert result.returncode == 1
    assert "cannot push to me/tiny: HF_HUB_OFFLINE is set" in result.stderr
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    card = ModelCard.load(out / "README.md")
    assert card.data.sft_template == "alpaca" and card.data.hyperparameters["max_steps"] == 2
    assert card.data.hyperparameters["lr_scheduler_type"] == "linear"  # enums written as plain YAML strings
    assert TOKEN not in result.stdout + result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path  # incl. the pickled training_args.bin

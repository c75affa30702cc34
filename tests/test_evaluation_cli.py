"""`sft-hf evaluate` / recipes/evaluate.py (sft_hf/evaluation/cli.py) end to end: generate → responses JSON → metrics →
judge; bad arguments are one line before any generation; judging saved responses never imports torch."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from sft_hf.builtin.toy import make_toy_records
from sft_hf.evaluation import cli as evaluate_recipe  # noqa: E402  (recipes/evaluate.py runs it)
from sft_hf.evaluation.generation import extract_response, generate_responses
from sft_hf.evaluation.judge import make_judge_prompt
from sft_hf.evaluation.metrics import reference_metrics
from sft_hf.templates import get_template

from conftest import ROOT, SHARED_DATA
from eval_helpers import FakeJudgeServer, _chatty_model_dir  # noqa: F401  (fixture chatty_model_dir)


@pytest.fixture(scope="module")
def model_and_tokenizer(chatty_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(chatty_model_dir), AutoTokenizer.from_pretrained(chatty_model_dir)


@pytest.fixture
def dataset_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(make_toy_records(40, seed=11)))  # split 85/10/5 in file order: test = [34:38]
    return path


def fake_score(prompt):
    return len(prompt) % 101  # any fixed function of the prompt; the test recomputes it


def test_extract_response_as_chapter_7():
    prompt = "Below is an instruction...\n\n### Instruction:\nName a color."
    assert extract_response(prompt + "\n\n### Response:\nBlue.\n", prompt) == "Blue."
    assert extract_response("### Response:\n Blue.") == "Blue."
    assert extract_response("  Blue. ### Response: no") == "Blue. ### Response: no"  # only a leading header
    assert extract_response("<|assistant|>:\nBlue.", template="phi3") == "Blue."


def test_batched_left_padded_generation_equals_one_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    records = [{"instruction": "Say hi." + " please" * i, "input": "x" * (3 * i), "output": ""} for i in range(6)]
    one_by_one = generate_responses(model, tokenizer, records, "alpaca", 8, batch_size=1, show_progress=False)
    batched = generate_responses(model, tokenizer, records, "alpaca", 8, batch_size=4, show_progress=False)
    assert batched == one_by_one
    assert len(set(one_by_one)) > 1  # the prompts really differ in what they make the model write
    # Single-process `distributed=True` is the plain path.
    assert generate_responses(model, tokenizer, records, "alpaca", 8, batch_size=4, show_progress=False,
                              distributed=True) == one_by_one


def test_one_command_generates_scores_and_judges(tmp_path, dataset_file, chatty_model_dir, model_and_tokenizer, capsys):
    model, tokenizer = model_and_tokenizer
    out = tmp_path / "eval"
    with FakeJudgeServer(lambda prompt: f"{fake_score(prompt)}") as server:
        report = evaluate_recipe.main([
            "--model", chatty_model_dir, "--dataset_name", str(dataset_file), "--max_new_tokens", "6",
            "--batch_size", "3", "--judge_backend", "ollama", "--judge_url", server.url, "--output_dir", str(out),
        ])
    test_records = make_toy_records(40, seed=11)[34:38]
    expected = generate_responses(model, tokenizer, test_records, "alpaca", 6, show_progress=False)
    saved = json.loads((out / "test_responses.json").read_text())
    assert saved == [{**r, "model_response": e} for r, e in zip(test_records, expected)]  # chapter 7's shape

    scores = [fake_score(make_judge_prompt(r)) for r in saved]
    judged = report["judge"]["model_response"]
    assert (judged["num_scores"], judged["num_items"]) == (4, 4)
    assert judged["average"] == pytest.approx(sum(scores) / 4)
    assert report["metrics"]["model_response"] == reference_metrics(expected, [r["output"] for r in test_records])
    assert json.loads((out / "metrics.json").read_text()) == report["metrics"]
    printed = capsys.readouterr().out
    assert "Number of scores: 4 of 4" in printed and f"Average score: {sum(scores) / 4:.2f}" in printed
    assert {"judge_histogram.png", "judge_scores_model_response.json", "evaluation.json"} <= {
        p.name for p in out.iterdir()}


def test_responses_file_two_columns_openai_judge(tmp_path, monkeypatch):
    records = json.loads((SHARED_DATA / "eval-example-data.json").read_text())[:8]
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(records))
    keys = ["model 1 response", "model 2 response"]
    monkeypatch.setenv("JUDGE_KEY", "k-123")
    with FakeJudgeServer(lambda prompt: f"Score: {fake_score(prompt)}") as server:
        report = evaluate_recipe.main([
            "--responses", str(responses), "--response_keys", *keys, "--judge_backend", "openai",
            "--judge_url", server.url + "/v1", "--judge_model", "judge", "--judge_api_key_env", "JUDGE_KEY",
            "--output_dir", str(tmp_path / "out"),
        ])
    for key in keys:
        scores = [fake_score(make_judge_prompt(r, key)) for r in records]
        assert report["judge"][key]["average"] == pytest.approx(sum(scores) / 8)
        assert report["metrics"][key] == reference_metrics([r[key] for r in records], [r["output"] for r in records])
    assert report["metrics"][keys[0]] != report["metrics"][keys[1]]


def test_conversation_responses_are_scored_against_their_last_reply(tmp_path):
    """A chat run's test_responses.json: `messages` (the reference is the final assistant turn) + `model_response`."""
    def conversation(question, answer, response):
        return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": question},
                             {"role": "assistant", "content": answer}], "model_response": response}

    records = [conversation("2+3?", "5", "5"), conversation("Capital of France?", "Paris", "Lyon")]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(records))
    report = evaluate_recipe.main(["--responses", str(path), "--output_dir", str(tmp_path / "o")])
    assert report["metrics"]["model_response"] == reference_metrics(["5", "Lyon"], ["5", "Paris"])
    assert report["metrics"]["model_response"]["exact_match"] == 0.5
    prompt = make_judge_prompt(records[1])  # the judge sees the turns before the reply, and the expected reply
    assert "system: Be brief.\nuser: Hi\nassistant: Hello.\nuser: Capital of France?" in prompt
    assert "correct output `Paris`" in prompt and "model response `Lyon`" in prompt


def test_bad_responses_file_names_record_and_field(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b", "model_response": "c"}, {"instruction": "a",
                                                                                              "output": "b"}]))
    with pytest.raises(ValueError, match=r"r.json: record 1, field 'model_response'"):
        evaluate_recipe.main(["--responses", str(path), "--output_dir", str(tmp_path / "o")])


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate CLI not installed")
def test_accelerate_launch_two_processes_gives_the_same_responses(tmp_path, dataset_file, chatty_model_dir):
    single = tmp_path / "single"
    evaluate_recipe.main(["--model", chatty_model_dir, "--dataset_name", str(dataset_file), "--max_samples", "3",
                          "--max_new_tokens", "6", "--no_metrics", "--output_dir", str(single)])
    multi = tmp_path / "multi"
    config = tmp_path / "cpu_2proc.yaml"  # torchrun with 2 processes; the recipe makes them use the CPU (gloo)
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nuse_cpu: true\n"
                      "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nmain_process_port: 0\n"
                      "rdzv_backend: static\nsame_network: true\ngpu_ids: all\nmixed_precision: 'no'\n")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    run = subprocess.run(
        [accelerate, "launch", "--config_file", str(config), str(ROOT / "recipes" / "evaluate.py"),
         "--model", chatty_model_dir, "--dataset_name", str(dataset_file), "--max_samples", "3",
         "--max_new_tokens", "6", "--no_metrics", "--output_dir", str(multi)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Generated 3 responses on 2 process(es)" in run.stdout  # 2 + 1 records, gathered in record order
    single_records = json.loads((single / "test_responses.json").read_text())
    assert len(single_records) == 3 and len({r["model_response"] for r in single_records}) > 1
    assert json.loads((multi / "test_responses.json").read_text()) == single_records


def test_template_comes_from_the_model_folder(tmp_path):
    from sft_hf.run.outputs import load_template, save_template

    for name in ("chatml", "phi3"):
        save_template(get_template(name), str(tmp_path))
        assert load_template(str(tmp_path)) is get_template(name)  # the built-in, with its own class
    assert load_template(str(tmp_path), "alpaca") is get_template("alpaca")  # --template wins
    custom = {"name": "mine", "prompt": "Q: {instruction}", "input": " ({input})", "response": "\nA: "}
    (tmp_path / "sft_template.json").write_text(json.dumps(custom))
    assert load_template(str(tmp_path)).format_prompt({"instruction": "hi", "input": "x"}) == "Q: hi (x)\nA: "
    assert load_template(str(tmp_path / "none")).name == "alpaca"


def test_multiple_choice_from_the_recipe_before_and_after(tmp_path, chatty_model_dir, tiny_model_dir, capsys):
    pytest.importorskip("lm_eval")
    from sft_hf.evaluation.multiple_choice import run_local_mc

    rows = [{"subject": "math", "question": f"What is {i} + 1?", "choices": [str(i + 1), str(i), str(i + 2), "0"],
             "answer": 0} for i in range(3)]
    task_file = tmp_path / "mc.jsonl"
    task_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = evaluate_recipe.main(["--model", chatty_model_dir, "--mc_task_file", str(task_file),
                                   "--mc_base_model", tiny_model_dir, "--output_dir", str(tmp_path / "out")])
    assert report["mc"]["num_questions"] == 3 and set(report["mc"]["subjects"]) == {"math"}
    assert report["mc"]["overall"] == report["mc"]["subjects"]["math"]
    assert report["mc"]["overall"] in (0, 1 / 3, 2 / 3, 1)
    assert report["mc_base"] == run_local_mc(tiny_model_dir, task_file)  # "before": the base model's own run
    saved = json.loads((tmp_path / "out" / "mc_results.json").read_text())
    assert saved["mc"] == report["mc"] and saved["mc_base"] == report["mc_base"]
    table = capsys.readouterr().out.split("subject ")[-1].strip().split("\n\n")[0].splitlines()
    assert table[0].split() == ["before", "after"]
    assert table[-1].split() == ["overall", f"{report['mc_base']['overall']:.4f}", f"{report['mc']['overall']:.4f}"]


def run_evaluate(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "evaluate.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_evaluate_bad_arguments_are_one_line_before_any_generation(tmp_path):
    result = run_evaluate("--responses", str(tmp_path / "missing.json"), cwd=tmp_path)
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        2, f"error: --responses {tmp_path / 'missing.json'}: no such file")
    # the judge backend is checked before the model is loaded or anything generated
    result = run_evaluate("--model", "builtin:tiny-llama", "--dataset_name", "builtin:toy-tasks", "--judge_backend",
                          "olama", "--output_dir", str(tmp_path / "ev"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown --judge_backend 'olama': use ollama, openai, hf (did you mean 'ollama'?)")
    assert not (tmp_path / "ev").exists()
    result = run_evaluate("--responses", "r.json", "--judge_backnd", "hf", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: command line: unknown option --judge_backnd; did you mean --judge_backend?")


def test_judging_saved_responses_never_imports_torch(tmp_path):
    # no model runs, so none of the ~8 s of torch + Trainer imports (the metrics' `evaluate` library is off here)
    responses = tmp_path / "responses.json"
    responses.write_text('[{"instruction": "Say hi.", "input": "", "output": "Hi.", "model_response": "Hi."}]')
    probe = (f"import runpy, sys\nsys.argv = [{str(ROOT / 'recipes' / 'evaluate.py')!r}, *sys.argv[1:]]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as e:\n    print('EXIT', e.code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe, "--responses", str(responses), "--metrics", "false",
                             "--output_dir", str(tmp_path / "eval")], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "EXIT 0 False", result.stdout + result.stderr[-2000:]

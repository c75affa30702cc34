"""`sft-hf launch` (sft_hf/run/launch.py): a failed or interrupted run ends with the script's own line and exit code,
not the launcher's traceback."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tiny_setup import GOOD, ROOT, write_jsonl


def test_launched_bad_data_ends_with_the_error_and_its_exit_code(tmp_path):
    """`sft-hf launch` on 2 processes: the error once (each process meets it; the first one prints it), every bad
    record in it, then nothing from the launcher (`accelerate launch` adds torchrun's ChildFailedError report)."""
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD] * 5 + [{"instruction": "a", "output": 3}, GOOD, {"output": "x"}])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(
        [sys.executable, "-m", "sft_hf", "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
         str(ROOT / "recipes" / "train.py"), "--model_name_or_path", "builtin:tiny-llama", "--dataset_name", path,
         "--output_dir", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert all(" INFO sft_hf" in line for line in lines[:-3])  # before it only the start-up log (threads)
    assert lines[-3:] == [
        f"error: {path}: 2 bad records (fix them, or pass --skip_bad_records true to drop them):",
        "  record 5 (line 6), field 'output': expected text, got int 3",
        "  record 7 (line 8), field 'instruction': missing",
    ]
    assert not (tmp_path / "out").exists()


def test_ctrl_c_under_sft_hf_launch_ends_with_the_scripts_line_not_a_launcher_traceback(tmp_path):
    ready = tmp_path / "ready"
    # a shell's background job ignores SIGINT, and so would its children: restore the default, as in a terminal
    restore_sigint = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    process = subprocess.Popen(
        [sys.executable, "-c", restore_sigint + "import sys; from sft_hf.cli import main; sys.exit(main())", "launch",
         "--num_processes", "1", "--cpu", str(Path(__file__).parent / "scripts" / "wait_for_ctrl_c.py"), str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.count("error:") == 1  # the launcher adds nothing
    assert err.strip().splitlines()[-1] == ("error: interrupted at step 3 of 5; run the same command with "
                                            "--resume_from_checkpoint true")

"""2 gloo processes, each with its own shard of the gradients / weights (as under FSDP or ZeRO-3); only process 1's
shard is NaN. StopOnNonFiniteLoss must raise on both (one all-reduced flag), or process 0 would go on alone and wait
for process 1 forever. Writes rank<N>.json into the folder given; run by tests/test_safety.py."""
import json
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import TrainerControl, TrainerState

from sft_hf.errors import NonFiniteLossError
from sft_hf.run.safety import StopOnNonFiniteLoss


def run(rank: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=2)
    results = {}
    for case in ("gradient", "deepspeed weight"):
        model = torch.nn.Linear(3, 2)
        args = types.SimpleNamespace(fp16=False, deepspeed=None, device=torch.device("cpu"), output_dir=out_dir)
        if case == "gradient":
            model.weight.grad = torch.full((2, 3), float("nan") if rank == 1 else 0.0)
            model.bias.grad = torch.zeros(2)
            hooks = ["on_pre_optimizer_step"]
        else:  # ZeRO-3: no gradients before the update, each weight an empty placeholder holding `ds_tensor`
            args.deepspeed = "ds_config.json"
            for p in model.parameters():
                p.ds_tensor = torch.full((3,), float("nan") if rank == 1 else 1.0)
            hooks = ["on_pre_optimizer_step", "on_step_end"]
        for hook in hooks:
            try:
                getattr(StopOnNonFiniteLoss(), hook)(args, TrainerState(global_step=6), TrainerControl(), model=model)
                results[f"{case} {hook}"] = None
            except NonFiniteLossError as e:
                results[f"{case} {hook}"] = str(e).split(" is NaN")[0]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.start_processes(run, args=(sys.argv[1],), nprocs=2, join=True, start_method="fork")  # no re-imports

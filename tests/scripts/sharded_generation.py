"""Generation with weights sharded by FSDP2, on 2 CPU processes (gloo), for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/scripts/sharded_generation.py MODEL_DIR RECORDS_JSON OUT_JSON \
        MAX_NEW_TOKENS AVAILABLE_BYTES

Each decoder layer and the whole model go through torch's `fully_shard`, as accelerate's FSDP2 does on GPUs: every
forward pass then all-gathers the weights from both processes, so both must run the same forward passes. Then, as recipes/train.py does:
1. the full model, the batch size left to `default_batch_size` with AVAILABLE_BYTES of free memory (so each process
   would size it from its own prompts), exact match's path;
2. the same model with LoRA adapters (peft), `batch_size=2` as a recipe's `generation_batch_size` gives it.
Process 0 writes {"full": [...], "lora": [...]} to OUT_JSON. A hang ends in a traceback of every process.
"""
import faulthandler
import json
import sys
import types

faulthandler.dump_traceback_later(150, exit=True)

import psutil  # noqa: E402
import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402

model_dir, records_file, out_file, max_new_tokens, available = sys.argv[1:6]
state = PartialState(cpu=True)  # joins the gloo group torchrun set up
# what `default_batch_size` reads: the same small amount of free memory on both processes
_memory = psutil.virtual_memory()._asdict()
psutil.virtual_memory = lambda: types.SimpleNamespace(**{**_memory, "available": int(available)})

from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from sft_hf.evaluation.generation import generate_responses  # noqa: E402


def sharded(model):
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    # Recent torch marks the modules `fully_shard` manages with the flag transformers' `is_fsdp_managed_module` reads
    # to turn `synced_gpus` on; older torch does not, nor does FSDP1's or ZeRO-3's path. Cleared, so that the answers
    # must come from generate_responses keeping the processes in step itself.
    for module in model.modules():
        module.__dict__.pop("_is_fsdp_managed_module", None)
    return model


tokenizer = AutoTokenizer.from_pretrained(model_dir)
records = json.loads(open(records_file).read())
results = {}
model = sharded(AutoModelForCausalLM.from_pretrained(model_dir))
results["full"] = generate_responses(model, tokenizer, records, "raw", int(max_new_tokens), show_progress=False,
                                     distributed=True)
base = AutoModelForCausalLM.from_pretrained(model_dir)
torch.manual_seed(0)
lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
sharded(lora.base_model.model)
results["lora"] = generate_responses(lora, tokenizer, records, "raw", int(max_new_tokens), batch_size=2,
                                     show_progress=False, distributed=True)
if state.is_main_process:
    with open(out_file, "w") as f:
        json.dump(results, f)
state.wait_for_everyone()
torch.distributed.destroy_process_group()

"""The CPU speed levers of sft_hf/speed/ change how a step is computed, never what it computes: the fused output
projection + cross-entropy gives the stock loss and gradients, the master-weight AdamW is torch's fused AdamW on
fp32 weights, the sparse tied-embedding gradient is the dense one, attention by matmul is SDPA's, and bf16
weights with fp32 masters train as fp32 does (within 1% of its loss) and resume exactly. They run on any CPU (bf16
is emulated where the CPU has no bf16 units: slower, the same arithmetic)."""
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_hf import InstructionTrainer, parse_recipe, tokenize_dataset
from sft_hf.collator import InstructionDataCollator
from sft_hf.speed import linear_cross_entropy as lce
from sft_hf.speed.master_weights import MasterWeightAdamW
from sft_hf.speed.varlen_attention import causal_attention_by_matmul
from sft_hf.trainer import sparse_tied_embedding_gradient


@pytest.mark.parametrize("dtype, vocab", [(torch.float32, 5000), (torch.float32, 6144), (torch.bfloat16, 9001)])
def test_fused_head_and_cross_entropy_equal_the_stock_loss_and_gradients(monkeypatch, dtype, vocab):
    monkeypatch.setattr(lce, "CHUNK", 1024)  # several chunks, the last one partial for 5000 and 9001
    torch.manual_seed(0)
    hidden = torch.randn(37, 64).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, 64) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (37,))
    targets[:3] = torch.tensor([0, vocab - 1, 1023])  # the edges of the vocabulary and of a chunk
    fused = lce.linear_cross_entropy(hidden, weight, targets, num_items_in_batch=50)
    fused.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    stock = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum") / 50
    stock.backward()
    assert fused.item() == pytest.approx(stock.item(), rel=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-7)
    else:  # bf16: a rounding apart at most (softmax's gradient formed otherwise; hidden's summed in fp32 here)
        for ours, stock in zip(grads, (hidden.grad, weight.grad)):
            assert (ours.float() - stock.float()).abs().max() <= 2 ** -7 * stock.float().abs().max()


def test_master_weight_adamw_is_torchs_fused_adamw_on_fp32_weights():
    torch.manual_seed(0)
    shapes = [(300, 7), (5,), (1 << 17, 3)]  # one tensor larger than a chunk
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = MasterWeightAdamW([{"params": ours[:2], "weight_decay": 0.1}, {"params": ours[2:], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW([{"params": theirs[:2], "weight_decay": 0.1}, {"params": theirs[2:], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for step in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a) * (step + 1)
            b.grad = a.grad.clone()
        norm = opt.clip_grad_norm_(1.0)
        assert norm.item() == pytest.approx(torch.nn.utils.clip_grad_norm_(theirs, 1.0).item(), rel=1e-6)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_master_copy_survives_a_state_dict_round_trip():
    p = torch.nn.Parameter(torch.randn(10).bfloat16())
    p._fp32_master = torch.randn(10)  # what cast_to_bf16_keeping_masters leaves
    exact = p._fp32_master.clone()
    opt = MasterWeightAdamW([p], lr=0.1)
    p.grad = torch.ones(10, dtype=torch.bfloat16)
    opt.step()
    assert not hasattr(p, "_fp32_master")
    saved = opt.state_dict()
    reloaded = MasterWeightAdamW([p], lr=0.1)
    reloaded.load_state_dict(saved)
    master = reloaded.state[p]["master"]
    assert master.dtype == torch.float32  # torch would have cast it to the parameter's bf16
    assert torch.equal(master, opt.state[p]["master"]) and not torch.equal(master, exact)


def test_the_sparse_tied_embedding_gradient_is_the_dense_one(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    model(input_ids=ids, labels=ids).loss.backward()
    dense = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad(set_to_none=True)
    assert sparse_tied_embedding_gradient(model)
    model(input_ids=ids, labels=ids).loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad.layout == torch.strided  # the optimizer still gets a dense gradient
    torch.testing.assert_close(grad, dense, rtol=1e-6, atol=1e-8)


def test_attention_by_matmul_is_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 29, 16, dtype=torch.float64) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention_by_matmul(q, k, v), expected)
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))  # bf16 scores, fp32 softmax: HF's eager attention in bf16
    assert (causal_attention_by_matmul(q16, k16, v16).double() - expected).abs().max() < 0.05


def _trainer(model_dir, records, output_dir, *flags, steps=20):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = tokenize_dataset(Dataset.from_list(records), tokenizer, "alpaca", 256, verbose=False)
    args = parse_recipe(["--output_dir", str(output_dir), "--per_device_train_batch_size", "8",
                         "--learning_rate", "3e-3", "--max_steps", str(steps), "--logging_steps", "1",
                         "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--seed", "0",
                         "--report_to", "none", "--disable_tqdm", "true", "--max_grad_norm", "1.0", *flags],
                        default_recipe=None)[2]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    collator = InstructionDataCollator(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    return InstructionTrainer(model=model, args=args, train_dataset=data, data_collator=collator)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_fused_cross_entropy_trains_as_the_stock_loss(tiny_model_dir, instruction_records, tmp_path):
    records = instruction_records[:64]
    runs = {}
    for fused in ("true", "false"):
        trainer = _trainer(tiny_model_dir, records, tmp_path / fused, "--precision", "fp32", "--save_strategy", "no",
                           "--fused_cross_entropy", fused, steps=6)
        trainer.train()
        runs[fused] = (_losses(trainer), trainer)
    assert runs["true"][1]._fused_head and not runs["false"][1]._fused_head
    assert runs["true"][0] == pytest.approx(runs["false"][0], rel=1e-5)
    assert runs["true"][0][-1] < runs["true"][0][0]


def test_bf16_master_weights_train_as_fp32_and_resume_exactly(tiny_model_dir, instruction_records, tmp_path):
    records = instruction_records[:160]
    fp32 = _trainer(tiny_model_dir, records, tmp_path / "fp32", "--precision", "fp32", "--save_strategy", "no")
    fp32.train()
    bf16 = _trainer(tiny_model_dir, records, tmp_path / "bf16", "--precision", "bf16", "--save_strategy", "steps",
                    "--save_steps", "10")
    assert bf16.args.precision_plan.master_weights and not bf16.args.bf16  # no autocast: the weights themselves are bf16
    bf16.train()
    saved = torch.load(tmp_path / "bf16" / "checkpoint-10" / "optimizer.pt", weights_only=True)["state"][0]
    assert saved["master"].dtype == saved["exp_avg"].dtype == torch.float32  # the checkpoint keeps the fp32 truth
    # after training the model holds the fp32 masters: what is evaluated and saved is full precision
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    losses, reference = _losses(bf16), _losses(fp32)
    assert losses[0] != reference[0]  # bf16 matmuls did run
    assert abs(losses[0] - reference[0]) / reference[0] < 0.01
    assert abs(sum(losses[-5:]) - sum(reference[-5:])) / sum(reference[-5:]) < 0.01
    assert sum(reference[-5:]) < 0.8 * 5 * reference[0]  # it learned: the comparison means something
    # resumed from step 10, the run ends with the uninterrupted run's weights, bit for bit
    resumed = _trainer(tiny_model_dir, records, tmp_path / "bf16", "--precision", "bf16", "--save_strategy", "no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "bf16" / "checkpoint-10"))
    for (name, a), b in zip(bf16.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_a_second_train_casts_again_and_starts_a_new_optimizer(tiny_model_dir, instruction_records, tmp_path):
    from transformers import TrainerCallback

    class WeightDtypes(TrainerCallback):
        seen = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seen.append(next(model.parameters()).dtype)

    trainer = _trainer(tiny_model_dir, instruction_records[:32], tmp_path, "--precision", "bf16",
                       "--save_strategy", "no", steps=2)
    trainer.add_callback(WeightDtypes())
    for _ in range(2):
        trainer.train()
        assert trainer.optimizer is None and all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert WeightDtypes.seen == [torch.bfloat16] * 4  # both runs trained bf16 weights, not fp32 ones by mistake


def test_onednn_linear_matches_nn_linear(tiny_model_dir):
    from sft_hf.speed import onednn_linear

    if onednn_linear._linear is None or not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN linear op")
    stock = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fast = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_linear = sum(type(m) is torch.nn.Linear for m in fast.modules())
    assert onednn_linear.use_onednn_linear(fast) == n_linear == 2 * 7 + 1  # 7 per layer + the LM head
    assert list(fast.state_dict()) == list(stock.state_dict())  # save_pretrained writes the same tensors
    ids = torch.randint(3, stock.config.vocab_size, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    losses = []
    for model in (stock, fast):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for (name, p_stock), p_fast in zip(stock.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p_fast.grad, p_stock.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_onednn_linear_takes_zero_rows_like_nn_linear(tiny_model_dir):
    """An MoE expert that routed no tokens calls its linears on an empty [0, hidden] input: forward and backward must
    give empty / zero results as nn.Linear does (oneDNN cannot build the weight-gradient product for them)."""
    from sft_hf.speed import onednn_linear

    if onednn_linear._linear is None or not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN linear op")
    torch.manual_seed(0)
    stock = torch.nn.Linear(7, 3)
    fast = torch.nn.Linear(7, 3)
    fast.load_state_dict(stock.state_dict())
    assert onednn_linear.use_onednn_linear(fast) == 1
    for shape in ((0, 7), (2, 0, 7)):
        for layer in (stock, fast):
            layer.zero_grad()
            x = torch.empty(*shape, requires_grad=True)
            y = layer(x)
            assert y.shape == (*shape[:-1], 3)
            (y.sum() + 0.0).backward()
            assert x.grad.shape == x.shape
            assert torch.equal(layer.weight.grad, torch.zeros(3, 7)) and torch.equal(layer.bias.grad, torch.zeros(3))

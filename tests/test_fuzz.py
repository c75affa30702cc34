"""Invariants of tokenize + collate, fuzzed over random records, templates and tokenizers (hypothesis).

Either it works, or it raises TemplateError (the one error type of the tokenizing stage). When it works: every kept row
has at least one trained token and its EOS trained, no padding position is trained, with completion_only_loss no
prompt token is trained, and untruncated rows are exactly the template's prompt + response + EOS.
"""
import itertools

import datasets
import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import processors
from transformers import AutoTokenizer

from sft_hf.collator import IGNORE_INDEX, InstructionDataCollator, resolve_pad_token_id
from sft_hf.templates import ChatTemplate, TemplateError, get_template
from sft_hf.tokenization import encode_records, tokenize_dataset
from sft_hf.builtin.toy import make_toy_records, train_bpe_tokenizer

CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Tokenizer variants: pad == eos, a separate pad, no pad, BOS added to every prompt, a chat template, no eos."""
    datasets.disable_caching()  # hundreds of tiny in-memory maps: no cache files
    alpaca = get_template("alpaca")
    folder = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer([alpaca.format_prompt(r) + r["output"] for r in make_toy_records(200, 1)], 300).save_pretrained(
        folder)
    variants = {name: AutoTokenizer.from_pretrained(folder) for name in
                ("eos_is_pad", "separate_pad", "no_pad", "bos", "chat", "no_eos")}
    variants["separate_pad"].add_special_tokens({"pad_token": "<pad>"})
    variants["no_pad"].pad_token = None
    bos = variants["bos"]
    bos.add_special_tokens({"bos_token": "<s>"})
    bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos.bos_token_id)])
    variants["chat"].chat_template = CHATML_JINJA
    variants["no_eos"].eos_token = None
    variants["no_eos"].pad_token = None
    assert bos("a")["input_ids"][0] == bos.bos_token_id and variants["no_eos"].eos_token_id is None
    return variants


plain_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="{}"), max_size=30)
records = st.lists(
    st.fixed_dictionaries({
        "instruction": plain_text,
        "input": st.one_of(st.none(), plain_text),
        "output": st.one_of(plain_text, st.sampled_from(["", " ", "\n", "4", "héllo wörld 🙂"])),
    }),
    min_size=1, max_size=6,
)
custom_templates = st.builds(
    lambda before, after, input_part, response, name: {
        "name": name, "prompt": before + "{instruction}" + after, "input": input_part, "response": response},
    plain_text, st.sampled_from(["", "}}", "{{literal}}"]), st.sampled_from(["", "\n{input}", " [{input}]"]),
    plain_text, st.just("custom"),
)
templates = st.one_of(st.sampled_from(["alpaca", "phi3", "chatml", "chat_template", "raw"]), custom_templates)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(
    records=records,
    template=templates,
    tokenizer_name=st.sampled_from(["eos_is_pad", "separate_pad", "no_pad", "bos", "chat", "no_eos"]),
    max_length=st.one_of(st.none(), st.integers(1, 120)),
    completion_only_loss=st.booleans(),
    padding_free=st.booleans(),
    pad_to_multiple_of=st.sampled_from([None, 8]),
)
def test_tokenize_and_collate_invariants(tokenizers, records, template, tokenizer_name, max_length,
                                         completion_only_loss, padding_free, pad_to_multiple_of):
    tokenizer = tokenizers[tokenizer_name]
    template = get_template(template)
    try:
        rows = tokenize_dataset(Dataset.from_list(records), tokenizer, template, max_length, verbose=False).to_list()
    except TemplateError as e:
        event(f"TemplateError: {str(e).split(':')[0][:40]}")
        return  # the one clean error type: no eos, no chat template, max_length too small, empty prompt, ...
    event("tokenized")
    eos = tokenizer.eos_token_id
    assert eos is not None  # a tokenizer without one must have raised

    # Rows are exactly prompt + response + EOS; only over-long responses are dropped, only prompts are cut.
    special = not isinstance(template, ChatTemplate)
    expected_rows = []
    for record in records:
        prompt, response = template.render(record, tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        if max_length is None or len(response_ids) <= max_length - 1:
            keep = len(prompt_ids) if max_length is None else min(len(prompt_ids), max_length - len(response_ids))
            # a cut prompt keeps its leading special tokens (BOS) and loses the tokens after them
            n_special = min(keep, next((i for i, t in enumerate(prompt_ids) if t not in tokenizer.all_special_ids),
                                       len(prompt_ids)))
            kept = prompt_ids[:n_special] + prompt_ids[len(prompt_ids) - (keep - n_special):]
            expected_rows.append((kept + response_ids, keep, [0] * keep + [1] * len(response_ids)))
    assert [(r["input_ids"], r["prompt_length"], r["completion_mask"]) for r in rows] == expected_rows

    collator = InstructionDataCollator(
        pad_token_id=resolve_pad_token_id(tokenizer), completion_only_loss=completion_only_loss,
        max_length=max_length, pad_to_multiple_of=pad_to_multiple_of, padding_free=padding_free)
    batch = collator(rows)
    if padding_free:
        segments, labels = split_padding_free(batch)
        real = sum(len(r["input_ids"]) for r in rows)
        if pad_to_multiple_of and real % pad_to_multiple_of:  # a filler example up to the multiple, never trained
            filler, filler_labels = segments.pop(), labels.pop()
            assert len(filler) == pad_to_multiple_of - real % pad_to_multiple_of
            assert set(filler) == {resolve_pad_token_id(tokenizer)} and set(filler_labels) == {IGNORE_INDEX}
        assert len(segments) == len(rows) and sum(map(len, segments)) == real  # no padding otherwise
    else:
        segments, labels = [], []
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
            assert (batch["labels"][i, n:] == IGNORE_INDEX).all()  # no padding position is trained
            assert batch["input_ids"].shape[1] % (pad_to_multiple_of or 1) == 0
            segments.append(batch["input_ids"][i, :n].tolist())
            labels.append(batch["labels"][i, :n].tolist())

    for row, ids, target in zip(rows, segments, labels):
        n, n_prompt = len(row["input_ids"]), row["prompt_length"]
        assert ids == row["input_ids"] and n_prompt >= 1
        trained = [j for j in range(1, n) if target[j] != IGNORE_INDEX]  # position 0 is never a target
        assert trained, "every kept row trains at least one token"
        assert ids[-1] == eos and target[-1] == eos, "the row's EOS is trained"
        assert all(target[j] == ids[j] for j in trained)
        if completion_only_loss:
            assert trained == list(range(n_prompt, n)), "exactly the response + EOS, no prompt token"
        else:
            assert trained == list(range(1, n))


def split_padding_free(batch):
    """Cut the single padding-free row back into examples where position_ids restart at 0."""
    ids, positions, labels = (batch[k][0].tolist() for k in ("input_ids", "position_ids", "labels"))
    starts = [j for j, p in enumerate(positions) if p == 0] + [len(ids)]
    assert "attention_mask" not in batch
    pairs = list(itertools.pairwise(starts))
    return [ids[a:b] for a, b in pairs], [labels[a:b] for a, b in pairs]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=records, max_length=st.integers(1, 80))
def test_nothing_but_template_error_escapes_for_small_max_length(tokenizers, records, max_length):
    """The error a user sees for a tight max_length is a TemplateError naming max_length, never a deeper failure."""
    try:
        rows = tokenize_dataset(Dataset.from_list(records), tokenizers["eos_is_pad"], "alpaca", max_length,
                                verbose=False)
    except TemplateError as e:
        assert f"max_length={max_length}" in str(e)
        return
    assert all(len(r["input_ids"]) <= max_length for r in rows)
    assert torch.tensor([r["prompt_length"] for r in rows]).min() >= 1


# ---------------------------------------------------------------------------------------------------- conversations

chat_text = st.text(st.characters(categories=("L", "N", "P", "Zs"), exclude_characters="<>{}"), min_size=1,
                    max_size=25)
conversations = st.builds(
    lambda system, exchanges: ([{"role": "system", "content": system}] if system else [])
    + [m for user, reply in exchanges for m in ({"role": "user", "content": user},
                                                 {"role": "assistant", "content": reply})],
    st.one_of(st.none(), chat_text), st.lists(st.tuples(chat_text, chat_text), min_size=1, max_size=4))


@pytest.fixture(scope="module")
def chat_tokenizers(tokenizers, tmp_path_factory):
    """ChatML as plain text (EOS <|endoftext|> follows the last <|im_end|>), and ChatML with special tokens and
    EOS = <|im_end|> (SmolLM2, Qwen)."""
    folder = tmp_path_factory.mktemp("chatml")
    tokenizers["eos_is_pad"].save_pretrained(folder)
    special = AutoTokenizer.from_pretrained(folder)
    special.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    special.eos_token = special.pad_token = "<|im_end|>"
    special.chat_template = CHATML_JINJA
    return {"plain": tokenizers["chat"], "special": special}


def runs(ids, mask):
    out, previous = [], 0
    for token, trained in zip(ids, mask):
        if trained and not previous:
            out.append([])
        if trained:
            out[-1].append(token)
        previous = trained
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(
    messages=st.lists(conversations, min_size=1, max_size=4),
    template=st.sampled_from(["chatml", "chat_template"]),
    tokenizer_name=st.sampled_from(["plain", "special"]),
    max_length=st.one_of(st.none(), st.integers(8, 120)),
    trained_turns=st.sampled_from(["all", "last"]),
    padding_free=st.booleans(),
)
def test_conversation_mask_invariants(chat_tokenizers, messages, template, tokenizer_name, max_length, trained_turns,
                                      padding_free):
    """Each kept row trains exactly its completion mask (padded or padding-free); untruncated, the trained runs are
    the replies + end-of-turn (+ EOS after the last), decoded; truncated, a suffix of those runs (the first one
    possibly cut), the last whole, the system prompt kept when only whole exchanges were dropped, and the leading
    special token kept."""
    tok = chat_tokenizers[tokenizer_name]
    records = [{"messages": m} for m in messages]
    try:
        rows = tokenize_dataset(Dataset.from_list(records), tok, template, max_length, verbose=False,
                                trained_turns=trained_turns).to_list()
    except TemplateError as e:
        event(f"TemplateError: {str(e).split(':')[0][:40]}")
        assert max_length is not None  # only a max_length too small for the template's own text
        return
    full = [e.row() for e in encode_records(records, tok, template, None, trained_turns)]
    kept = [f for f, e in zip(full, encode_records(records, tok, template, max_length, trained_turns)) if e]
    assert len(kept) == len(rows)
    end = tok.eos_token if template == "chatml" else "<|im_end|>"
    for record, row, whole in zip([r for r, e in zip(records, encode_records(records, tok, template, max_length,
                                                                               trained_turns)) if e], rows, kept):
        ids, mask = row["input_ids"], row["completion_mask"]
        assert len(ids) == len(mask) == row["length"] == sum(t["length"] for t in row["turns"])
        assert ids[-1] == tok.eos_token_id and mask[-1] == 1 and mask[0] == 0
        replies = [m["content"] + end for m in record["messages"] if m["role"] == "assistant"]
        if end != tok.eos_token:
            replies[-1] += tok.eos_token
        expected = replies[-1:] if trained_turns == "last" else replies
        assert [tok.decode(r) for r in runs(whole["input_ids"], whole["completion_mask"])] == expected
        if max_length is not None:
            assert len(ids) <= max_length
        if row["truncated"]:
            event("truncated" + (" with dropped turns" if row["dropped_turns"] else ""))
            got, want = runs(ids, mask), runs(whole["input_ids"], whole["completion_mask"])
            assert got[-1] == want[-1] and len(got) <= len(want)
            for g, w in zip(got, want[len(want) - len(got):]):
                assert g == w or (g is got[0] and w[len(w) - len(g):] == g)
            if row["dropped_turns"] and len(ids) < max_length and record["messages"][0]["role"] == "system":
                assert record["messages"][0]["content"] in tok.decode(ids)  # the system prompt stays
        else:
            assert row == whole
        if tokenizer_name == "special":
            assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # a cut row keeps its leading special token
    collator = InstructionDataCollator(pad_token_id=tok.pad_token_id, completion_only_loss=True,
                                       max_length=max_length, padding_free=padding_free)
    batch = collator(rows)
    if padding_free:
        _, labels = split_padding_free(batch)
    else:
        labels = [batch["labels"][i, : len(r["input_ids"])].tolist() for i, r in enumerate(rows)]
    for row, target in zip(rows, labels):
        assert target[1:] == [t if m else IGNORE_INDEX for t, m in zip(row["input_ids"], row["completion_mask"])][1:]

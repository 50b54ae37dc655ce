"""Rollouts: the prompt loader, sampling (left padding, EOS, masks), response log-probs, rewards, frozen models."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallel.dims import ParallelConfig  # noqa: E402
from parallel.engine import build_runtime, load_model  # noqa: E402
from parallel.tiny import build_tokenizer  # noqa: E402
from tests.training.rl_helpers import write_reward_model  # noqa: E402
from training.frozen import Frozen, RewardModel  # noqa: E402
from training.prompts import build_prompts, load_prompts, parse_prompt_row  # noqa: E402
from training.rewards import RuleReward, exact_match, first_number_match, load_reward_fn  # noqa: E402
from training.sampling import decode_responses, left_pad, mask_after_eos, response_logprobs, sample  # noqa: E402

RUNTIME = build_runtime(ParallelConfig())


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir).eval()


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _ids(tok, *questions):
    return [
        tok(
            tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for q in questions
    ]


# ---- loader -------------------------------------------------------------------------------------------


def test_prompt_and_reference_of_each_row_shape():
    user = {"role": "user", "content": "What is 2 + 3?"}
    assert parse_prompt_row({"messages": [user, {"role": "assistant", "content": "5"}]}) == ([user], "5")
    # Every turn before the LAST assistant turn is prompt, earlier answers included.
    multi = [
        {"role": "system", "content": "Be brief."},
        user,
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 2 + 4?"},
        {"role": "assistant", "content": "6"},
    ]
    assert parse_prompt_row({"messages": multi}) == (multi[:4], "6")
    assert parse_prompt_row({"messages": [user]}) == ([user], None)  # no answer: a prompt without reference
    assert parse_prompt_row({"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}) == ([user], "5")
    chosen = [user, {"role": "assistant", "content": "5"}]
    assert parse_prompt_row({"prompt": [user], "chosen": chosen, "rejected": "6"}) == ([user], "5")
    assert parse_prompt_row({"prompt": "What is 2 + 3?"}) == ([user], None)


def test_loader_counts_unusable_rows_and_never_raises_on_one(tok, tmp_path):
    good = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}
    rows = [
        good,
        {"prompt": "Add 1 and 1.", "chosen": "2", "rejected": "3"},
        {"prompt": "Name a colour."},
        "not a row",
        {"text": "no prompt here"},
        {"messages": "nope"},
        {"messages": [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]},
        {"prompt": "   ", "chosen": "a", "rejected": "b"},
        {"messages": [{"role": "assistant", "content": "hi"}]},
        {"prompt": "Why?", "chosen": "  ", "rejected": "b"},
        {"prompt": "long " * 60, "chosen": "a"},
    ]
    prompts, stats = build_prompts(rows, tok, max_prompt_len=64)
    assert [p.reference for p in prompts] == ["5", "2", None]
    assert prompts[0].input_ids == _ids(tok, "What is 2 + 3?")[0]
    assert tok.decode(prompts[0].input_ids).endswith("<|im_start|>assistant\n")  # the generation prompt
    assert (stats.rows, stats.prompts, stats.with_reference) == (11, 3, 2)
    assert stats.rejected == {
        "bad_messages": 2,
        "empty_prompt": 1,
        "empty_reference": 1,
        "no_prompt": 1,
        "no_prompt_turn": 1,
        "not_an_object": 1,
        "prompt_too_long": 1,
    }
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps("row") + "\n")
    with pytest.raises(ValueError, match=r"no usable prompt out of 2 rows .*no_prompt"):
        load_prompts(tmp_path, "bad", tok, 64)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path, "missing", tok, 64)


# ---- sampling -----------------------------------------------------------------------------------------


def test_mask_after_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9], [2, 9, 9, 9, 9]])
    mask, ended = mask_after_eos(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, True, False, True]
    mask, _ = mask_after_eos(ids, [2, 6])  # any of several end tokens
    assert mask[0].tolist() == [1, 1, 0, 0, 0]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_sampled_rollout_shapes_masks_and_eos(model, tok):
    prompts = _ids(tok, "What is 2 + 3?", "Hi", "Compute 7 times 8.")
    pad = tok.pad_token_id
    free = sample(
        model, prompts, pad_id=pad, eos_ids=[tok.eos_token_id], max_new_tokens=6, runtime=RUNTIME, greedy=True
    )
    assert free.prompt_ids.shape == (3, max(map(len, prompts))) and free.response_ids.shape[0] == 3
    assert free.response_ids.shape[1] <= 6 and free.input_ids.shape == free.attention_mask.shape
    # A random model rarely stops by itself: make the token it writes second in row 0 the end token.
    stop = int(free.response_ids[0, 1])
    ended = sample(model, prompts, pad_id=pad, eos_ids=[stop], max_new_tokens=6, runtime=RUNTIME, greedy=True)
    assert ended.ended[0] and ended.response_mask[0, :2].tolist() == [1, 1]
    assert ended.response_mask[0, 2:].sum() == 0 and (ended.response_ids[0, 2:] == pad).all()
    assert ended.lengths[0] == 2 and torch.equal(ended.response_ids[0, :2], free.response_ids[0, :2])
    for row in range(3):  # each row stops at its first end token (kept), nothing after it counts
        n = int(ended.lengths[row])
        hit = (free.response_ids[row] == stop).nonzero()
        assert n == (int(hit[0]) + 1 if len(hit) else free.response_ids.shape[1])
    text = decode_responses(tok, ended)[0]
    assert text == tok.decode(free.response_ids[0, :1].tolist())  # the end token is not part of the text
    # Sampling gives the same shapes and masks contract.
    torch.manual_seed(0)
    drawn = sample(
        model,
        prompts,
        pad_id=pad,
        eos_ids=[tok.eos_token_id],
        max_new_tokens=5,
        runtime=RUNTIME,
        temperature=1.3,
        top_p=0.9,
    )
    assert drawn.response_ids.shape[1] <= 5 and (drawn.response_mask.sum(1) >= 1).all()
    assert torch.equal(
        drawn.response_ids[drawn.response_mask == 0], torch.full_like(drawn.response_ids[drawn.response_mask == 0], pad)
    )


def test_left_padded_batch_generates_and_scores_like_each_prompt_alone(model, tok):
    prompts = _ids(tok, "What is 2 + 3?", "Hi", "Swap the first and last letters of: padding")
    kwargs = dict(pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id], max_new_tokens=8, runtime=RUNTIME, greedy=True)
    batch = sample(model, prompts, **kwargs)
    batch_logp = response_logprobs(model, batch, RUNTIME, 1.0)
    for row, prompt in enumerate(prompts):
        alone = sample(model, [prompt], **kwargs)
        n = int(alone.lengths[0])
        assert batch.lengths[row] == n and torch.equal(batch.response_ids[row, :n], alone.response_ids[0, :n])
        # Position ids skip the padding, so the training forward sees the padded prompt as the unpadded one.
        alone_logp = response_logprobs(model, alone, RUNTIME, 1.0)
        assert torch.allclose(batch_logp[row, :n], alone_logp[0, :n], atol=1e-5)


def test_response_logprobs_match_what_generate_sampled_from(model, tok):
    prompts = _ids(tok, "What is 2 + 3?", "Hi")
    ids, mask = left_pad(prompts, tok.pad_token_id)
    torch.manual_seed(0)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=4,
        do_sample=True,
        top_k=0,
        temperature=0.7,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    rollout = sample(
        model,
        prompts,
        pad_id=tok.pad_token_id,
        eos_ids=[tok.eos_token_id],
        max_new_tokens=4,
        runtime=RUNTIME,
        temperature=0.7,
    )
    assert torch.equal(rollout.response_ids, out.sequences[:, ids.shape[1] :])
    expected = (
        torch.log_softmax(torch.stack(out.logits, 1) / 0.7, -1)
        .gather(2, rollout.response_ids.unsqueeze(-1))
        .squeeze(-1)
    )
    assert torch.allclose(response_logprobs(model, rollout, RUNTIME, 0.7), expected, atol=1e-4)


# ---- rewards and frozen models ------------------------------------------------------------------------


def test_rule_rewards_and_how_they_are_named():
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    assert exact_match(prompt, " 5\n", "5") == 1.0 and exact_match(prompt, "5.", "5") == 0.0
    assert exact_match(prompt, "5", None) == 0.0
    assert first_number_match(prompt, "It is 5, I think", "5") == 1.0 and first_number_match(prompt, "6", "5") == 0.0
    assert load_reward_fn("training.rewards:exact_match") is exact_match
    for spec, message in (
        ("training.rewards", "not of the form"),
        ("recipes.nope:f", "cannot import module"),
        ("training.rewards:nope", "has no attribute 'nope'"),
        ("training.rewards:math", "not callable"),
    ):
        with pytest.raises(ValueError, match=message):
            load_reward_fn(spec)
    scorer = RuleReward("training.rewards:exact_match")
    assert scorer([prompt, prompt], ["5", "4"], ["5", "5"]) == [1.0, 0.0]


def test_reward_model_scores_the_rendered_conversation_whatever_the_batch(model_dir, tok, tmp_path):
    rm_dir = write_reward_model(model_dir, tmp_path / "rm")
    offloaded = RewardModel(rm_dir, RUNTIME, offload=True)
    assert next(offloaded.frozen.model.parameters()).device.type == "cpu"
    assert not any(p.requires_grad for p in offloaded.frozen.model.parameters())
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Say something long"}]]
    together = offloaded(prompts, ["5", "a much longer answer than the first"], [None, None])
    alone = offloaded(prompts[:1], ["5"], [None])
    assert together[0] == pytest.approx(alone[0], abs=1e-5) and together[0] != together[1]
    assert RewardModel(rm_dir, RUNTIME, offload=False)(prompts[:1], ["5"], [None]) == pytest.approx(alone)


def test_frozen_model_visits_the_device_only_inside_on_device(model_dir):
    frozen = Frozen(load_model(model_dir), RUNTIME, offload=True)
    assert not frozen.model.training and all(p.device.type == "cpu" for p in frozen.model.parameters())
    with frozen.on_device() as m:
        assert m is frozen.model and next(m.parameters()).device.type == RUNTIME.device.type
    assert next(frozen.model.parameters()).device.type == "cpu"

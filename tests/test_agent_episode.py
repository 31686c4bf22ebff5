"""Episodes as token arrays: hand-worked ids, masks, log-probs, spans and the token budget."""

from __future__ import annotations

import pytest
import torch

from vllm_train.agents.episode import Episode
from vllm_train.errors import VllmTrainError


def two_turn_episode(budget: int | None = None) -> Episode:
    # prompt 10 11 12 | model 20 21 <1> | tool 30 31 | model 22 <1>
    ep = Episode(budget).start([10, 11, 12])
    ep.add_model_turn([20, 21, 1], [-0.1, -0.2, -0.3], "stop")
    ep.add_env_segment([30, 31], "tool")
    ep.add_model_turn([22, 1], [-0.4, -0.5], "stop")
    return ep


def test_arrays_mark_and_score_only_model_tokens():
    ep = two_turn_episode()
    ep.end("done")
    assert ep.input_ids == [10, 11, 12, 20, 21, 1, 30, 31, 22, 1]
    assert ep.loss_mask == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    assert ep.sampled_logprobs == pytest.approx([0, 0, 0, -0.1, -0.2, -0.3, 0, 0, -0.4, -0.5])
    assert ep.prompt_length == 3
    assert ep.completion_ids == [20, 21, 1, 30, 31, 22, 1]
    assert ep.completion_mask == [1, 1, 1, 0, 0, 1, 1]
    assert ep.completion_logprobs == pytest.approx([-0.1, -0.2, -0.3, 0, 0, -0.4, -0.5])
    assert [(s.kind, s.start, s.end, s.turn) for s in ep.segments] == [
        ("prompt", 0, 3, -1), ("model", 3, 6, 0), ("tool", 6, 8, 0), ("model", 8, 10, 1)]
    c = ep.counters
    assert (c.model_turns, c.model_tokens, c.env_tokens, c.tool_calls) == (2, 5, 2, 0)
    assert (ep.done, ep.truncated, ep.end_reason) == (True, False, "done")
    t = ep.tensors()
    assert t["input_ids_T"].dtype == torch.long and t["loss_mask_T"].dtype == torch.bool
    assert t["loss_mask_T"].tolist() == [bool(m) for m in ep.loss_mask]
    assert t["sampled_logprobs_T"].tolist() == pytest.approx(ep.sampled_logprobs)


def test_single_turn_is_the_one_segment_case():
    ep = Episode().start([5, 6])
    ep.add_model_turn([7, 1], [-1.0, -2.0], "stop")
    ep.end("done")
    assert ep.completion_ids == [7, 1] and ep.completion_mask == [1, 1]
    assert ep.stats()["model_turns"] == 1 and ep.stats()["truncated"] == 0.0


def test_budget_cuts_a_model_turn_and_ends_truncated():
    # budget 7 after the prompt: turn 1 (3) + tool (2) leave 2, so turn 2's 4 tokens are cut to 2
    ep = Episode(7).start([10, 11, 12])
    ep.add_model_turn([20, 21, 1], [-0.1, -0.2, -0.3], "stop")
    ep.add_env_segment([30, 31], "tool")
    assert ep.tokens_left == 2
    ep.add_model_turn([22, 23, 24, 1], [-0.4, -0.5, -0.6, -0.7], "stop")
    assert ep.completion_ids == [20, 21, 1, 30, 31, 22, 23]
    assert ep.completion_logprobs == pytest.approx([-0.1, -0.2, -0.3, 0, 0, -0.4, -0.5])
    assert (ep.done, ep.truncated, ep.end_reason) == (True, True, "max_episode_tokens")
    assert ep.counters.model_tokens == 5


def test_budget_drops_an_environment_segment_that_does_not_fit():
    # budget 5: turn (3) leaves 2; a 3-token tool result is dropped whole, nothing of it appended
    ep = Episode(5).start([10])
    ep.add_model_turn([20, 21, 1], [-0.1, -0.2, -0.3], "stop")
    assert ep.add_env_segment([30, 31, 32], "tool") is False
    assert ep.input_ids == [10, 20, 21, 1]
    assert (ep.truncated, ep.end_reason, ep.counters.env_tokens) == (True, "max_episode_tokens", 0)


def test_an_environment_segment_that_fills_the_budget_ends_the_episode():
    ep = Episode(5).start([10])
    ep.add_model_turn([20, 21, 1], [0.0, 0.0, 0.0], "stop")
    assert ep.add_env_segment([30, 31], "user") is True  # fits, but leaves no room for a model token
    assert ep.input_ids[-2:] == [30, 31] and ep.tokens_left == 0
    assert (ep.done, ep.truncated) == (True, True)


@pytest.mark.parametrize("build,message", [
    (lambda: Episode().start([1]).add_model_turn([2, 3], [0.0], "stop"), "Episode.add_model_turn: 2 token ids"),
    (lambda: Episode().add_model_turn([2], [0.0], "stop"), "Episode.add_model_turn: call start"),
    (lambda: Episode().start([1]).add_env_segment([2], "system"), "Episode.add_env_segment: kind"),
    (lambda: Episode().start([]), "Episode.start: empty"),
    (lambda: Episode(0), "Episode: max_episode_tokens"),
])
def test_bad_input_names_the_method(build, message):
    with pytest.raises(VllmTrainError, match=message):
        build()


def test_nothing_is_added_after_the_end():
    ep = two_turn_episode()
    ep.end("done")
    ep.end("other")  # the first reason stays
    assert ep.end_reason == "done"
    with pytest.raises(VllmTrainError, match=r"Episode.add_env_segment: the episode has ended \(done\)"):
        ep.add_env_segment([9], "tool")

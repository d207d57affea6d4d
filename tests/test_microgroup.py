"""The micro-group schedule (docs/algorithm.md#trapo): cut points, levels, the four sample layouts from scripted rewards."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from trapo_jax import losses
from trapo_jax.algorithms import prefix_rft
from trapo_jax.algorithms import uft
from trapo_jax.sampling import microgroup
from trapo_jax.sampling import rollout
from tests.helpers import DEMO0, DEMO1, L, SPLIT, FakeBatch, fake_batch, fake_sampler, scripted_grader



@pytest.mark.parametrize("demo, ratio, expected", [
    # thr = floor(12 * 0.25) = 3; first split after it at 5 < 12 * 0.55 = 6.6 -> cut after it.
    ([1, 2, 3, SPLIT, 4, SPLIT, 5, 6, 7, 8, 9, 10], 0.25, 6),
    # No split token after thr at all -> floor.
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 0.25, 3),
    # A split exactly at thr does not count (j > thr); the next one (index 9) is outside the window (< 6.6).
    ([1, 2, 3, SPLIT, 4, 5, 6, 7, 8, SPLIT, 9, 10], 0.25, 3),
    # Window edge: 10 tokens, ratio 0.2 -> thr 2, limit 10 * 0.5 = 5.0; a split at 5 is not < 5.0 -> floor.
    ([1, 2, 3, 4, 5, SPLIT, 6, 7, 8, 9], 0.2, 2),
    # ... while ratio 0.25 -> limit 5.5 takes the split at 5.
    ([1, 2, 3, 4, 5, SPLIT, 6, 7, 8, 9], 0.25, 6),
    # Ratio 1.0: everything.
    ([1, SPLIT, 2, 3, 4], 1.0, 5),
    # A demo shorter than 4 tokens: 25% is floor(3 * 0.25) = 0 unless a split follows inside the window.
    ([1, 2, 3], 0.25, 0),
    ([7, SPLIT, 3], 0.25, 2),  # thr 0, split at 1 < 3 * 0.55 = 1.65 -> cut 2
    ([], 0.5, 0),
])
def test_prefix_cut(demo, ratio, expected):
  assert microgroup.prefix_cut(demo, ratio, [SPLIT]) == expected


def test_next_level_thresholds():
  # After stage 1 (4 samples): < 2 correct -> level 1.
  assert [microgroup.next_level(1, s) for s in range(5)] == [1, 1, 0, 0, 0]
  # After stage 2 (6 samples): < 4 -> level 2.
  assert [microgroup.next_level(2, s) for s in range(7)] == [2, 2, 2, 2, 0, 0, 0]
  # After stage 3 (7 samples): anything but 7/7 -> level 3 (full expert).
  assert [microgroup.next_level(3, s) for s in range(8)] == [3] * 7 + [0]


# ---------------------------------------------------------------------------------------------------------------
# Scripted rollouts: prompt rewards per stage decide the layout.

LAYOUTS = {
    # 4 pure (1 correct -> level 1), 2 x 25% (S=3 -> level 2), 1 x 50% (S=4 -> level 3), 1 expert.
    "full_guidance": ([[0, 0, 0, 1], [1, 1], [1], [1]], [0, 1, 2, 3], [0, 0, 0, 0, .25, .25, .5, 1.]),
    # 4 pure (S=2 -> level 0), 2 pure (S=2 -> level 2: the 0 -> 2 jump), 1 x 50%, 1 expert.
    "jump_to_50": ([[1, 1, 0, 0], [0, 0], [1], [1]], [0, 0, 2, 3], [0, 0, 0, 0, 0, 0, .5, 1.]),
    # 4 + 2 + 1 pure (one failure -> level 3), 1 expert.
    "expert_only": ([[1, 1, 1, 1], [1, 0], [1], [1]], [0, 0, 0, 3], [0, 0, 0, 0, 0, 0, 0, 1.]),
    # all 7 solved: an 8th pure rollout.
    "pure": ([[1, 1, 1, 1], [1, 1], [1], [1]], [0, 0, 0, 0], [0.] * 8),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layouts_from_scripted_rewards(name):
  script, levels, ratios = LAYOUTS[name]
  calls = []
  rb = rollout.collect(microgroup.Plan(), fake_batch(1), fake_sampler(calls), scripted_grader([script]), [SPLIT])
  assert rb.levels.tolist() == [levels]
  np.testing.assert_allclose(rb.ratio, ratios)
  assert [c["n"] for c in calls] == [4, 2, 1, 1]
  assert rb.tokens.shape == (8, L) and rb.group_ids.tolist() == [0] * 8
  np.testing.assert_array_equal(rb.rewards, np.concatenate(script))
  # Row kinds follow the ratios: own rollouts, guided continuations, the whole demonstration.
  assert rb.kind.tolist() == [losses.ROW_OWN if r == 0 else losses.ROW_DEMO if r == 1 else losses.ROW_GUIDED
                              for r in ratios]
  # Prefix lengths: 25% of 16 -> thr 4, split at 7 < 8.8 -> 8 tokens; 50% -> thr 8, split at 11 < 12.8 -> 12.
  expected_k = {0.0: 0, 0.25: 8, 0.5: 12, 1.0: 6}
  for row, ratio in enumerate(ratios):
    k = expected_k[ratio]
    assert rb.prefix_mask[row].sum() == k
    assert rb.prefix_mask[row, :k].all()
    demo = DEMO1 if ratio == 1.0 else DEMO0
    np.testing.assert_array_equal(rb.tokens[row, :k], demo[:k])
  # The full-expert sample is demo #1 + EOS alone, nothing generated; its whole response gets the prefix loss.
  if ratios[-1] == 1.0:
    assert not calls[3]["active"][0]
    np.testing.assert_array_equal(rb.tokens[7, :7], DEMO1 + [0])
    np.testing.assert_array_equal(rb.off_loss_mask[7], rb.response_mask[7])
    assert rb.response_mask[7].sum() == 6
  # Which prefixes are imitated: the 2nd of the two 25% samples, the 50% sample, the expert; nothing else.
  imitated = [bool(rb.off_loss_mask[r].any()) for r in range(8)]
  expected = [False] * 8
  for r, ratio in enumerate(ratios):
    expected[r] = ratio > 0 and not (ratio == 0.25 and r == 4)
  assert imitated == expected
  np.testing.assert_array_equal(rb.off_loss_mask & ~rb.prefix_mask, False)


def test_prompts_keep_their_own_layout_in_one_batch():
  scripts = [LAYOUTS["full_guidance"][0], LAYOUTS["pure"][0]]
  rb = rollout.collect(microgroup.Plan(), fake_batch(2), fake_sampler([]), scripted_grader(scripts), [SPLIT])
  assert rb.levels.tolist() == [LAYOUTS["full_guidance"][1], LAYOUTS["pure"][1]]
  assert rb.group_ids.tolist() == [0] * 8 + [1] * 8
  np.testing.assert_allclose(rb.ratio, LAYOUTS["full_guidance"][2] + LAYOUTS["pure"][2])


def test_fixed_ratio_plan_guides_every_prompt_and_imitates_once():
  plan = microgroup.Plan(guidance=microgroup.FixedRatio(ratio=0.5))
  rb = rollout.collect(plan, fake_batch(1), fake_sampler([]), scripted_grader([LAYOUTS["pure"][0]]), [SPLIT])
  np.testing.assert_allclose(rb.ratio, [0, 0, 0, 0, .5, .5, .5, .5])
  assert [bool(rb.off_loss_mask[r].any()) for r in range(8)] == [False] * 7 + [True]


def test_luffy_and_grpo_plans():
  luffy = microgroup.Plan(stages=(7, 1), guidance=microgroup.FixedRatio(ratio=1.0))
  rb = rollout.collect(luffy, fake_batch(1), fake_sampler([]), scripted_grader([[[1] * 7, [1]]]), [SPLIT])
  np.testing.assert_allclose(rb.ratio, [0] * 7 + [1])
  np.testing.assert_array_equal(rb.off_loss_mask[7], rb.response_mask[7])
  grpo = microgroup.Plan(stages=(8,), guidance=microgroup.Unguided())
  rb = rollout.collect(grpo, fake_batch(1), fake_sampler([]), scripted_grader([[[0] * 8]]), [SPLIT])
  assert not rb.prefix_mask.any() and rb.levels.tolist() == [[0]]


def test_demo_batch_for_sft():
  rb = rollout.demo_batch(fake_batch(2), which=(0, 1), max_len=10)
  assert rb.tokens.shape == (4, 10)
  np.testing.assert_array_equal(rb.tokens[0], DEMO0[:10])  # truncated to the response width
  np.testing.assert_array_equal(rb.tokens[1, :6], DEMO1)
  assert (rb.kind == losses.ROW_DEMO).all()
  one = rollout.demo_batch(fake_batch(2), max_len=10)  # one demonstration per problem by default (SFT)
  assert one.tokens.shape == (2, 10) and one.group_ids.tolist() == [0, 1]
  np.testing.assert_array_equal(one.tokens[1], DEMO0[:10])
  np.testing.assert_array_equal(rb.prefix_mask, rb.response_mask)
  np.testing.assert_array_equal(rb.off_loss_mask, rb.response_mask)


# ---------------------------------------------------------------------------------------------------------------
# One decode pass (docs/algorithm.md#one-pass): every alternative sampled at once, the stages' choice made after.

ROW_MARK, SAMPLE_MARK = 1000, 500  # generated tokens that name a row's key: ROW_MARK + row id, SAMPLE_MARK + sample


def _rows_to_arrays(rows):
  """[(prefix, continuation)] -> tokens, prefix_mask, response_mask [len(rows), L]."""
  tokens = np.zeros((len(rows), L), np.int32)
  prefix = np.zeros((len(rows), L), bool)
  resp = np.zeros((len(rows), L), bool)
  for r, (pre, cont) in enumerate(rows):
    tokens[r, :len(pre) + len(cont)] = list(pre) + list(cont)
    prefix[r, :len(pre)] = True
    resp[r, :len(pre) + len(cont)] = True
  return tokens, prefix, resp


def _keyed(row_id, sample):
  return [ROW_MARK + int(row_id), SAMPLE_MARK + int(sample), 2]


def _keyed_sampler(calls):
  """Stage by stage: sample j of prompt i continues its prefix with the tokens of its key (row_ids[i], j)."""
  def sample_fn(prompt_ids, prompt_lens, prefix_ids, prefix_lens, active, n, row_ids):
    calls.append(int(active.sum()) * n)
    return _rows_to_arrays([(prefix_ids[i, :prefix_lens[i]], _keyed(row_ids[i], j) if active[i] else [])
                            for i in range(len(prompt_lens)) for j in range(n)])
  return sample_fn


def _keyed_shared_sampler(calls):
  """One pass: row r of prompt i continues its branch's prefix with the tokens of its key (row_ids, sample_ids)."""
  def sample_fn(prompt_ids, prompt_lens, prefixes, prefix_lens, branches, row_ids, sample_ids):
    calls.append(row_ids.size)
    pre = lambda i, b: prefixes[i, b - 1, :prefix_lens[i, b - 1]] if b else []
    return _rows_to_arrays([(pre(i, b), _keyed(row_ids[i, r], sample_ids[i, r]))
                            for i in range(len(prompt_lens)) for r, b in enumerate(branches)])
  return sample_fn


def _keyed_grader(plan, table):
  """Rewards from the key a row's tokens name: table[prompt][(stage, guided)][sample]; a row without a key (a
  whole demonstration) gets table[prompt]["demo"]."""
  def grade_fn(tokens, response_mask, answers):
    out = []
    for row, mask, answer in zip(tokens, response_mask, answers):
      resp = row[mask].tolist()
      marks = [t for t in resp if t >= ROW_MARK]
      if not marks:
        out.append(table[int(answer)]["demo"])
        continue
      prompt, rest = divmod(marks[0] - ROW_MARK, 2 * len(plan.stages))
      assert prompt == int(answer), "a row keyed by another prompt"
      out.append(table[prompt][divmod(rest, 2)][resp[resp.index(marks[0]) + 1] - SAMPLE_MARK])
    return np.asarray(out, np.float32)
  return grade_fn


def _every_reward_combination(plan):
  """One prompt per combination of 0/1 rewards of every row any stage may use: bit k of prompt p's index is the
  reward of its k-th such row (generated rows in one-pass order, then the whole demonstration, which always gets the
  same reward)."""
  slots = [(a.stage, int(a.ratio > 0), j) for a in microgroup.alternatives(plan) if a.generated for j in range(a.size)]
  has_demo = any(not a.generated for a in microgroup.alternatives(plan))
  bits = len(slots) + has_demo
  table = []
  for p in range(2 ** bits):
    rewards = {}
    for k, (stage, guided, j) in enumerate(slots):
      rewards.setdefault((stage, guided), {})[j] = float((p >> k) & 1)
    rewards["demo"] = float((p >> len(slots)) & 1) if has_demo else None
    if plan.guidance.draws:  # one alternative per stage, guided or not as the draw falls
      rewards.update({(stage, 1 - guided): r for (stage, guided), r in [i for i in rewards.items() if i[0] != "demo"]})
    table.append(rewards)
  batch = fake_batch(1)
  g = len(table)
  batch = FakeBatch(prompt_ids=np.repeat(batch.prompt_ids, g, 0), prompt_lens=np.repeat(batch.prompt_lens, g),
                    demo_ids=np.repeat(batch.demo_ids, g, 0), demo_lens=np.repeat(batch.demo_lens, g, 0),
                    answers=[str(p) for p in range(g)])
  return batch, table


ONE_PASS_PLANS = {
    "trapo": microgroup.Plan(),
    "fixed_ratio": microgroup.Plan(guidance=microgroup.FixedRatio(ratio=0.5)),
    "luffy": microgroup.Plan(stages=(7, 1), guidance=microgroup.FixedRatio(ratio=1.0)),
    # Here a guided stage's rewards can undo the guidance of the next one (TRAPO's thresholds never let them).
    "other_thresholds": microgroup.Plan(stages=(2, 2, 2), guidance=microgroup.AdaptiveLevels(thresholds=(2, 3),
                                                                                             prefix_ratios=(0.5, 1.0))),
    "no_guidance": microgroup.Plan(stages=(4, 4), guidance=microgroup.Unguided()),
    # What a plan does after grading (appended demonstrations, the gate) and how it imitates and grades.
    "after_grading": microgroup.Plan(stages=(2, 2), guidance=microgroup.AdaptiveLevels(thresholds=(2,),
                                                                                       prefix_ratios=(0.5,)),
                                     demos=(0, 1), gate=1,
                                     imitate="all", grade_given=False),
    # Prefixes drawn per prompt and stage (Prefix-RFT; UFT's hints in more than one stage): nothing to choose.
    "prefix_rft": microgroup.Plan(stages=(2, 2, 2), guidance=prefix_rft.DrawnRatio(unguided=1, bounds=(0.1, 0.9)),
                                  imitate="all"),
    "hints": microgroup.Plan(stages=(3, 3), guidance=uft.Hints(prob=0.5, segments=3), imitate="all",
                             grade_given=False),
}


@pytest.mark.parametrize("name", sorted(ONE_PASS_PLANS))
def test_one_pass_keeps_the_rows_of_the_stages_for_every_reward_combination(name):
  plan = ONE_PASS_PLANS[name]
  batch, table = _every_reward_combination(plan)
  g = len(table)
  seq_calls, one_calls = [], []
  # Plans that draw prefixes draw the same ones from the same generator (in stage order) on either path.
  seq = rollout.collect(plan, batch, _keyed_sampler(seq_calls), _keyed_grader(plan, table), [SPLIT],
                        rng=np.random.default_rng(0), first_prompt=0)
  one = rollout.collect_one_pass(plan, batch, _keyed_shared_sampler(one_calls), _keyed_grader(plan, table), [SPLIT],
                                 first_prompt=0, rng=np.random.default_rng(0))
  for f in dataclasses.fields(rollout.RolloutBatch):
    if f.name not in ("sampled_rows", "decode_passes"):
      np.testing.assert_array_equal(getattr(one, f.name), getattr(seq, f.name), err_msg=f.name)
  assert one.decode_passes == 1 and one_calls == [g * plan.one_pass_rows] and one.sampled_rows == one_calls[0]
  assert seq.decode_passes == sum(c > 0 for c in seq_calls) and seq.sampled_rows == sum(seq_calls)
  if name == "trapo":
    # The paths the thresholds allow, by hand: S1 < 2 forces 25 %, 50 % and the demonstration (S stays < 4, < 7);
    # otherwise S2 < 4 forces 50 % and the demonstration; otherwise only 7/7 avoids the demonstration.
    assert {tuple(x) for x in one.levels} == {(0, 1, 2, 3), (0, 0, 2, 3), (0, 0, 0, 3), (0, 0, 0, 0)}
    assert seq.decode_passes == 4 and plan.one_pass_rows == 11 and one.sampled_rows == 11 * g


def test_one_pass_rows_per_prompt():
  # 4 own; 2 own + 2 at 25 %; 1 own + 1 at 50 %; 1 own (the demonstration is not generated).
  assert [(a.stage, a.level, a.size, a.ratio) for a in microgroup.alternatives(microgroup.Plan())] == [
      (0, 0, 4, 0.0), (1, 0, 2, 0.0), (1, 1, 2, 0.25), (2, 0, 1, 0.0), (2, 2, 1, 0.5), (3, 0, 1, 0.0), (3, 3, 1, 1.0)]
  assert {k: p.one_pass_rows for k, p in ONE_PASS_PLANS.items()} == {
      "trapo": 11, "fixed_ratio": 8, "luffy": 7, "other_thresholds": 2 + 4 + 2, "no_guidance": 8,
      "after_grading": 6, "prefix_rft": 6, "hints": 6}


def test_select_levels_on_the_scripted_layouts():
  plan = microgroup.Plan()
  for script, levels, _ in LAYOUTS.values():
    s1, s2, s3, s4 = (np.asarray([x], np.float32) for x in script)
    # Each later stage's rows are given for both levels; only the level the walk reaches may matter.
    rewards = [s1, s2, s2, s3, s3, s4, s4]
    assert microgroup.select_levels(plan, rewards).tolist() == [levels]
    decoy = [s1, s2 if levels[1] == 0 else 1 - s2, s2 if levels[1] else 1 - s2,
             s3 if levels[2] == 0 else 1 - s3, s3 if levels[2] else 1 - s3,
             s4 if levels[3] == 0 else 1 - s4, s4 if levels[3] else 1 - s4]
    assert microgroup.select_levels(plan, decoy).tolist() == [levels]

"""Why a step could not fill its groups, in words the user can act on."""

from __future__ import annotations


class NoLearningSignal(Exception):
    """A step found no group whose samples differ in reward, within buffer.max_refills: trial and error ends."""


def equal_rewards_verdict(rewards: list[float | None], threshold: float) -> str:
    """What a round of groups dropped for equal rewards says about the task, from the rewards scored (None: a
    sample without a reward, which leaves its group short of scored samples)."""
    unscored = sum(r is None for r in rewards)
    if unscored * 2 > len(rewards):
        return (
            f"{unscored} of the {len(rewards)} samples have no reward (their scoring failed, see the reward errors "
            "above, or every reward function returned None), so their groups had fewer than 2 scored samples "
            "(buffer.drop_zero_variance dropped each group)"
        )
    rewards = [r for r in rewards if r is not None]
    solved = sum(r >= threshold for r in rewards)
    if rewards and solved == len(rewards):
        return (
            "every sample of every new prompt was correct (buffer.drop_zero_variance dropped each group): the "
            "task is saturated"
        )
    if rewards and not solved:
        return (
            "no sample of any new prompt was correct (buffer.drop_zero_variance dropped each group): the model "
            "never solves these prompts"
        )
    return "each new prompt's samples got equal rewards (buffer.drop_zero_variance dropped each group)"


def refill_cause(before: dict[str, float], after: dict[str, float], failed: int) -> str:
    """Why refills did not produce a step's groups, from the buffer's counters before and after."""
    grew = {
        k: after[f"buffer_{k}"] - before[f"buffer_{k}"]
        for k in ("dropped_zero_variance", "dropped_stale", "evicted")
    }
    causes = []
    if grew["dropped_zero_variance"]:
        causes.append(
            f"{grew['dropped_zero_variance']:.0f} samples dropped because every sample of their prompt got the same "
            "reward (buffer.drop_zero_variance): the model always or never solves these prompts; turn "
            "drop_zero_variance off or change the task's difficulty"
        )
    if grew["dropped_stale"]:
        causes.append(
            f"{grew['dropped_stale']:.0f} samples dropped as staler than buffer.max_staleness (raise it, or lower "
            "schedule.sync_every)"
        )
    if grew["evicted"]:
        causes.append(f"{grew['evicted']:.0f} samples evicted: buffer.capacity holds less than one step")
    if failed:
        causes.append(f"{failed} prompts failed to generate (see the engines' errors above)")
    return "; ".join(causes) or "no complete group arrived (see the engines' and reward actors' errors above)"

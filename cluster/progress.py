"""The run's progress bars."""

from __future__ import annotations


def progress_fields(reward_mean: float, accuracy: float | None) -> dict[str, str]:
    """The trial-and-error bar's fields: this step's mean reward and the latest held-out accuracy, which holds
    between evaluations ("-" before the first one)."""
    return {"reward": f"{reward_mean:.2f}", "acc": "-" if accuracy is None else f"{100 * accuracy:.1f}%"}


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, initial=initial, disable=not enabled or total == 0, dynamic_ncols=True
    )

"""The trial-and-error progress bar: the latest held-out accuracy holds between evaluations, "-" before the
first one, never nan."""

from __future__ import annotations

import io
import re

from aha.cluster.progress import progress_fields


def test_fields_before_and_after_the_first_evaluation():
    assert progress_fields(0.4567, None) == {"reward": "0.46", "acc": "-"}
    assert progress_fields(1.0, 0.685) == {"reward": "1.00", "acc": "68.5%"}
    assert progress_fields(0.0, 0.0)["acc"] == "0.0%"  # an accuracy of 0 is shown, not taken for "none yet"


def test_bar_keeps_the_last_accuracy_between_evaluations():
    from tqdm import tqdm

    out = io.StringIO()
    bar = tqdm(total=4, file=out, ascii=True, mininterval=0)
    last = None
    for step, evaluated in enumerate([None, 0.5, None, None]):
        last = evaluated if evaluated is not None else last
        bar.update(1)
        bar.set_postfix(progress_fields(0.25 * step, last))
    bar.close()
    frames = [f for f in out.getvalue().replace("\r", "\n").splitlines() if "reward=" in f]
    shown = [re.search(r"acc=([^,\]]+)", f).group(1) for f in frames]
    first = shown.index("50.0%")
    assert set(shown[:first]) == {"-"} and set(shown[first:]) == {"50.0%"}  # held until the next evaluation
    assert "nan" not in out.getvalue()
    assert frames[-1].index("reward=") < frames[-1].index("acc=")  # in the order given

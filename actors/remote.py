"""Two patterns every pool of actors needs: start a named actor, and wait on calls with a deadline, naming the
actor that failed."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

K = TypeVar("K", bound=Hashable)


class CallError(RuntimeError):
    """Calls to some actors failed or found no answer in time; `failed` holds their keys, `died` those whose
    process is gone."""

    def __init__(self, message: str, failed: list, died: list | None = None):
        super().__init__(message)
        self.failed = failed
        self.died = died or []


def start_named_actor(
    actor_cls: Any, name: str, options: dict[str, Any], *args, wait_s: float = 30.0, **kwargs
):
    """`actor_cls.options(name=name, **options).remote(*args, **kwargs)`; a just-killed actor may hold its
    name a moment longer, so retry while the name is taken, up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return actor_cls.options(name=name, **options).remote(*args, **kwargs)
        except ValueError as e:
            if "already taken" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def await_calls(
    refs: dict[Any, K],
    timeout_s: float,
    what: str,
    name: Callable[[K], str] = str,
    fail_fast: bool = False,
    deadline: float | None = None,
) -> list[Any]:
    """The results of the calls in `refs` (ref -> the key of the actor called), in submission order. Raises
    `CallError` naming the actors whose call raised or found no answer within `timeout_s` (or by `deadline`, a
    `time.monotonic()` time, when given). `fail_fast`: raise at the first failure instead of waiting for the
    others (they may be blocked in a collective that waits for the failed one)."""
    import ray

    deadline = time.monotonic() + timeout_s if deadline is None else deadline
    results: dict[Any, Any] = {}
    errors: dict[K, BaseException] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(
            pending,
            num_returns=1 if fail_fast else len(pending),
            timeout=max(deadline - time.monotonic(), 0),
        )
        if not ready:
            break
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except ray.exceptions.RayError as e:
                errors.setdefault(refs[ref], e)
        if errors and fail_fast:
            break
    died = [k for k, e in errors.items() if isinstance(e, ray.exceptions.RayActorError)]
    if errors:
        first = next(refs[r] for r in refs if refs[r] in errors)  # in submission order
        cause = getattr(errors[first], "cause", None) or errors[first]
        verb = "died during" if first in died else "failed during"
        raise CallError(f"{name(first)} {verb} {what}: {cause}", list(errors), died)
    if pending:
        left = set(pending)
        missing = list(dict.fromkeys(k for r, k in refs.items() if r in left))
        raise CallError(
            f"{', '.join(name(k) for k in missing)}: no answer to {what} within {timeout_s:.0f} s", missing
        )
    return [results[r] for r in refs]


def placement_bundle(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """One actor's bundle: its CPUs, GPUs (if any) and custom resources (node types)."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **resources}


def reserve_placement_group(bundle: dict[str, float], count: int, strategy: str, timeout_s: float):
    """A placement group of `count` copies of `bundle`, once Ray has placed it; None (and nothing left
    reserved) when the cluster cannot hold it within `timeout_s`."""
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([dict(bundle) for _ in range(count)], strategy=strategy)
    if group.wait(timeout_seconds=timeout_s):
        return group
    remove_placement_group(group)
    return None

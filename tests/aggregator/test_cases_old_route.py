"""The older step route's table (``aggregator/api/events.py`` OLD_STEPS): each older action in
each case state stands for the one lifecycle step that takes the event to that action's
status, and the table leaves out no such step but the two it declines on purpose."""

from __future__ import annotations

import pytest

from aggregator.api.events import OLD_STEPS, OldStep
from aggregator.api.models import Action as OldAction
from aggregator.cases import Action, State, default_lifecycle
from aggregator.cases.rules import Requirement
from aggregator.pool.cases import EVENT_STATUS

TABLE = default_lifecycle()

# Lifecycle steps that reach an older action's status but are not what that action meant:
# "not ours" closes a case as someone else's, not as handled; an on-site acceptance is one the
# older route never knew (its "handle" is the off-site one).
DECLINED = {(State.REGISTERED, Action.NOT_OURS), (State.WHISTLED, Action.ACCEPT_ON_SITE)}


@pytest.mark.parametrize(("key", "step"), sorted(OLD_STEPS.items()), ids=str)
def test_each_mapped_step_lands_on_the_older_actions_status(
    key: tuple[OldAction, State], step: OldStep
) -> None:
    old, state = key
    t = TABLE.transition(state, step.action)
    assert t is not None, f"the lifecycle has no {step.action} from {state}"
    assert EVENT_STATUS[state] != old.target  # it moves the event
    assert EVENT_STATUS[t.to] == old.target
    # what the step requires, the older route supplies: a department, or the note as summary
    assert (Requirement.DEPARTMENTS in t.requires) == step.whistle_to_catalogue
    assert (Requirement.EVIDENCE in t.requires) == step.note_is_summary
    assert Requirement.REASON not in t.requires


def test_no_lifecycle_step_to_an_older_status_is_left_out() -> None:
    by_target = {old.target: old for old in OldAction}
    wanted = set()
    for t in TABLE.transitions:
        target = EVENT_STATUS[t.to]
        if target == EVENT_STATUS[t.from_] or target not in by_target:
            continue
        if (t.from_, t.action) in DECLINED:
            continue
        wanted.add((by_target[target], t.from_, t.action))
    mapped = {(old, state, step.action) for (old, state), step in OLD_STEPS.items()}
    assert mapped == wanted

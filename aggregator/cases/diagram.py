"""The lifecycle table drawn as a Mermaid state diagram, so documentation never drifts from it.

``python -m aggregator.cases.diagram`` prints the diagram of the shipped table.
"""

from __future__ import annotations

from aggregator.cases.deadlines import Span
from aggregator.cases.rules import ClockSpec, Lifecycle, Mode, State, Transition, default_lifecycle

__all__ = ["mermaid"]


def _span(spec: ClockSpec) -> str:
    if spec.by_mode is not None:
        return " / ".join(f"{mode} {spec.by_mode[mode].describe()}" for mode in Mode)
    if spec.span == "per_type":
        return "the type's deadline, generally PT2H"
    assert isinstance(spec.span, Span)  # the table validator allows nothing else here
    return spec.span.describe()


def _label(table: Lifecycle, t: Transition) -> str:
    roles = ", ".join(r.value for r in t.roles)
    parts = [f"{t.action.value} {table.actions[t.action].zh} [{roles}]"]
    for clock in t.starts:
        spec = table.clocks[clock]
        anchor = " from the whistle" if spec.anchor == "whistle" else ""
        parts.append(f"starts {clock.value} {_span(spec)}{anchor}")
    return " · ".join(parts)


def mermaid(lifecycle: Lifecycle | None = None) -> str:
    """A ``stateDiagram-v2``: one arrow per transition, labelled with the action, the levels
    that may take it and the clocks it starts; the extension steps, which keep the state, are
    one self-arrow per state."""
    table = lifecycle or default_lifecycle()
    lines = ["stateDiagram-v2", f"    [*] --> {State.REGISTERED.value}"]
    loops: dict[State, list[str]] = {}
    for t in table.transitions:
        if t.to is t.from_:
            roles = ", ".join(r.value for r in t.roles)
            loops.setdefault(t.from_, []).append(f"{t.action.value} [{roles}]")
            continue
        lines.append(f"    {t.from_.value} --> {t.to.value}: {_label(table, t)}")
    for state, labels in loops.items():
        lines.append(f"    {state.value} --> {state.value}: {' · '.join(labels)}")
    lines.append(f"    {State.CLOSED.value} --> [*]")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(mermaid())

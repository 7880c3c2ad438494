"""Each community's whistle list (Longgang 7.3.2) and whistle operator (7.3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.access.auth import Level, Operator
from aggregator.cases import Action, ForbiddenError, PayloadError, State, allowed_actions, apply
from aggregator.cases.whistle import load_whistle_lists
from aggregator.errors import ConfigError

from .case_support import COMMUNITY, OTHER_COMMUNITY, OTHER_GRID, T0, drive, new_case, operator

LISTS = f"""
default: {{items: [30]}}
communities:
  "{COMMUNITY}":
    items: [2, 4]
    types: [gas_leak]
    whistle_operator: wang
"""


@pytest.fixture
def lists_file(tmp_path: Path) -> Path:
    path = tmp_path / "whistle.yaml"
    path.write_text(LISTS, encoding="utf-8")
    return path


def test_a_community_whistles_only_what_it_listed(lists_file: Path) -> None:
    lists = load_whistle_lists(lists_file)
    policy = lists.policy_for(COMMUNITY)
    wang = Operator("wang", Level.COMMUNITY, COMMUNITY, None, "Wang")
    li = Operator("li", Level.COMMUNITY, COMMUNITY, None, "Li")
    body = {"lead_department": "fire", "co_departments": ["police"]}
    smoke, _ = drive(new_case(), [(Action.VERIFY, 1)])  # Appendix A item 30: not listed here
    with pytest.raises(PayloadError, match="whistle list"):
        apply(smoke, Action.WHISTLE, wang, body, T0, policy=policy)
    gas, _ = drive(new_case(type_code="gas_leak", appendix_item=None), [(Action.VERIFY, 1)])
    assert apply(gas, Action.WHISTLE, wang, body, T0, policy=policy).after is State.WHISTLED
    lane, _ = drive(new_case(type_code="fire_lane_occupied", appendix_item=2), [(Action.VERIFY, 1)])
    assert apply(lane, Action.WHISTLE, wang, body, T0, policy=policy).after is State.WHISTLED
    # 7.3: the community's named whistle operator blows the whistle, nobody else there.
    assert Action.WHISTLE in allowed_actions(lane, wang, policy=policy)
    assert Action.WHISTLE not in allowed_actions(lane, li, policy=policy)
    assert Action.SELF_HANDLE in allowed_actions(lane, li, policy=policy)
    with pytest.raises(ForbiddenError, match="whistle operator"):
        apply(lane, Action.WHISTLE, li, body, T0, policy=policy)
    # A street centre may still whistle for the community (Jiangsu 6.2, level 1).
    street = operator(Level.STREET)
    assert apply(lane, Action.WHISTLE, street, body, T0, policy=policy).after is State.WHISTLED
    # Departments are the catalogue's.
    with pytest.raises(PayloadError, match="unknown department 'water'"):
        apply(lane, Action.WHISTLE, wang, {"lead_department": "water"}, T0, policy=policy)


def test_communities_not_listed_take_the_default(lists_file: Path) -> None:
    policy = load_whistle_lists(lists_file).policy_for(OTHER_COMMUNITY)
    assert policy.whistle_operator is None
    case, _ = drive(
        new_case(grid=OTHER_GRID),
        [(Action.VERIFY, 1)],
        actors={Action.VERIFY: operator(Level.COMMUNITY, scope=OTHER_COMMUNITY)},
    )
    qian = operator(Level.COMMUNITY, scope=OTHER_COMMUNITY)
    step = apply(case, Action.WHISTLE, qian, {"lead_department": "fire"}, T0, policy=policy)
    assert step.after is State.WHISTLED


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("communities: {'33038310100': {items: [2]}}", "12 digits"),
        ("communities: {'330383101001': {items: [31]}}", "items 1–30"),
        ("communities: {'330383101001': {types: [unicorn]}}", "unknown types"),
        ("communities: {'330383101001': {item: [2]}}", "item"),
        ("default: {items: some}", "default"),
    ],
)
def test_bad_lists_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "whistle.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_whistle_lists(path)

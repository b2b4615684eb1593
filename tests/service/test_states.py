"""The status machine: the one table of legal moves."""

import pytest

from trinity_service.states import (ACTIVE, TERMINAL, TRANSITIONS, IllegalTransition, JobStatus as S, can_transition,
                        check_transition, is_terminal, sources)

LEGAL = [
    (S.validating_files, S.queued), (S.validating_files, S.failed), (S.validating_files, S.cancelled),
    (S.queued, S.running), (S.queued, S.cancelled), (S.queued, S.failed),
    (S.running, S.succeeded), (S.running, S.failed), (S.running, S.cancelling), (S.running, S.queued),
    (S.cancelling, S.cancelled), (S.cancelling, S.failed), (S.cancelling, S.succeeded),
]


def test_exactly_the_documented_moves_are_legal():
    every = {(a, b) for a in S for b in S}
    assert {(a, b) for a, b in every if can_transition(a, b)} == set(LEGAL)


@pytest.mark.parametrize("current,target", LEGAL)
def test_legal_moves_pass(current, target):
    check_transition(current, target)
    check_transition(current.value, target.value)  # plain strings from the database work too


@pytest.mark.parametrize("current,target", [
    (S.queued, S.succeeded),          # never ran
    (S.validating_files, S.running),  # must be queued first
    (S.running, S.cancelled),         # a running job is cancelled through cancelling
    (S.succeeded, S.running), (S.failed, S.queued), (S.cancelled, S.queued),  # terminal is final
    (S.queued, S.queued), (S.running, S.running),  # no self-loops
    (S.cancelling, S.running),
])
def test_illegal_moves_are_refused(current, target):
    assert not can_transition(current, target)
    with pytest.raises(IllegalTransition, match=f"from {current.value} to {target.value}"):
        check_transition(current, target)


def test_terminal_and_active_sets():
    assert TERMINAL == {S.succeeded, S.failed, S.cancelled}
    assert all(is_terminal(s) for s in TERMINAL) and not is_terminal(S.cancelling)
    assert ACTIVE == {S.running, S.cancelling}
    assert set(TRANSITIONS) == set(S)


def test_sources_inverts_the_table():
    assert sources(S.running) == {S.queued}
    assert sources(S.queued) == {S.validating_files, S.running}
    assert sources(S.cancelled) == {S.validating_files, S.queued, S.cancelling}


def test_unknown_status_is_an_error():
    with pytest.raises(ValueError):
        can_transition("paused", S.running)

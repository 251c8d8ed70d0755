"""chatd.core.rooms: every row of the section-9 command table, per role, by plain calls.

Roles: owner, moderator, member (on the member list), outsider (not on it, no grant), admin
(``role: "admin"`` in the access token, not on the list). Moderation targets are a plain member
unless a test says otherwise.
"""

from __future__ import annotations

import math

import pytest

from chatd.backends.base import RoomStanding
from chatd.config import RoomNamespace
from chatd.core import rooms
from chatd.core.rooms import Actor, Allowed, Grant, Policies, Refusal

NOW = 1_800_000_000.0
ROOM = "team:acme"
ROLES = ("owner", "moderator", "member", "outsider", "admin")

MEMBERS = RoomNamespace(name="team", access="members")
CREATABLE = RoomNamespace(name="team", access="members", allow_create=True)
OPEN = RoomNamespace(name="team", access="open")
TOKEN = RoomNamespace(name="team", access="token")


def actor(role: str, **kw: object) -> Actor:
    return Actor(user=role, admin=role == "admin", **kw)  # type: ignore[arg-type]


def standing(role: str, *, exists: bool = True, **kw: float | None) -> RoomStanding:
    stored = role if role in ("owner", "moderator", "member") else None
    return RoomStanding(exists=exists, role=stored, **kw)  # type: ignore[arg-type]


def moderate(command: str, role: str, policy: RoomNamespace = MEMBERS, *,
             target_role: str = "member", new_role: str | None = None,
             grant: Grant | None = None) -> Refusal | None:
    return rooms.may_moderate(command, policy, ROOM, actor(role), standing(role), NOW,
                              target="tgt", target_standing=standing(target_role),
                              role=new_role, grant=grant)


# -- namespaces and policies --------------------------------------------------------------------


@pytest.mark.parametrize(("room", "namespace"), [
    ("general", ""), ("team:acme", "team"), ("a:b:c", "a"), (":x", ""), ("support:42", "support"),
])
def test_the_namespace_is_the_part_before_the_first_colon(room: str, namespace: str) -> None:
    assert rooms.namespace_of(room) == namespace


def test_the_default_namespace_is_open_when_not_listed_and_others_are_refused() -> None:
    policies = Policies([MEMBERS])
    default = policies.for_room("general")
    assert default is not None and default.access == "open"
    assert policies.for_room("team:acme") is MEMBERS
    assert policies.for_room("support:1") is None


def test_a_listed_default_namespace_replaces_the_open_one() -> None:
    closed = RoomNamespace(name="", access="members")
    assert Policies([closed]).for_room("general") is closed


@pytest.mark.parametrize("role", ROLES)
def test_an_unconfigured_namespace_is_refused_to_everyone(role: str) -> None:
    verdict = rooms.access(None, "support:1", actor(role), standing(role), NOW)
    assert verdict == Refusal("forbidden", "namespace 'support' is not open to users")


# -- join, who, history, members: the access rule -----------------------------------------------


@pytest.mark.parametrize(("role", "expected"), [
    ("owner", "owner"), ("moderator", "moderator"), ("member", "member"),
    ("outsider", Refusal("forbidden", "not a member of team:acme")), ("admin", "owner"),
])
def test_members_rooms_admit_the_member_list_and_admins(role: str, expected: object) -> None:
    verdict = rooms.access(MEMBERS, ROOM, actor(role), standing(role), NOW)
    if isinstance(expected, Refusal):
        assert verdict == expected
    else:
        assert isinstance(verdict, Allowed) and verdict.role == expected
        assert verdict.admin == (role == "admin")


@pytest.mark.parametrize("role", ROLES)
def test_open_rooms_admit_everyone_with_their_stored_role(role: str) -> None:
    verdict = rooms.access(OPEN, ROOM, actor(role), standing(role, exists=False), NOW)
    assert isinstance(verdict, Allowed)
    assert verdict.role == {"outsider": None, "admin": "owner"}.get(role, role)


def test_an_outsider_is_told_the_same_whether_or_not_a_members_room_exists() -> None:
    exists = rooms.access(MEMBERS, ROOM, actor("outsider"), standing("outsider"), NOW)
    missing = rooms.access(MEMBERS, ROOM, actor("outsider"),
                           standing("outsider", exists=False), NOW)
    assert exists == missing == Refusal("forbidden", "not a member of team:acme")


def test_a_missing_members_room_is_not_found_only_for_who_could_have_joined_it() -> None:
    missing = standing("outsider", exists=False)
    assert rooms.access(MEMBERS, ROOM, actor("admin"), missing, NOW) == \
        Refusal("not_found", "no room team:acme")
    # In an allow_create namespace anyone could create (and so join) it: create would answer
    # conflict anyway, so not_found reveals nothing more.
    assert rooms.access(CREATABLE, ROOM, actor("outsider"), missing, NOW) == \
        Refusal("not_found", "no room team:acme")


@pytest.mark.parametrize("policy", [OPEN, MEMBERS, TOKEN], ids=lambda p: p.access)
@pytest.mark.parametrize("role", ["owner", "moderator", "member", "outsider"])
def test_a_ban_refuses_every_role_in_every_mode_until_it_ends(
        policy: RoomNamespace, role: str) -> None:
    me = actor(role, claim=(ROOM,))
    banned = standing(role, banned_until=NOW + 60)
    assert rooms.access(policy, ROOM, me, banned, NOW) == \
        Refusal("forbidden", f"banned until {int(NOW) + 60}")
    # Ended: the same record no longer bites (expiry needs nobody to lift it).
    verdict = rooms.access(policy, ROOM, me, banned, NOW + 60)
    assert isinstance(verdict, Allowed) or verdict == Refusal(
        "forbidden", "not a member of team:acme")
    assert role != "outsider" or policy.access != "members" or isinstance(verdict, Refusal)


def test_a_ban_without_duration_says_so() -> None:
    banned = standing("member", banned_until=math.inf)
    assert rooms.access(MEMBERS, ROOM, actor("member"), banned, NOW) == \
        Refusal("forbidden", "banned from team:acme")


def test_admins_are_never_held_by_bans_or_mutes() -> None:
    held = standing("admin", banned_until=math.inf, muted_until=math.inf)
    assert isinstance(rooms.access(MEMBERS, ROOM, actor("admin"), held, NOW), Allowed)
    assert isinstance(rooms.may_send(MEMBERS, ROOM, actor("admin"), held, NOW), Allowed)


# -- token rooms --------------------------------------------------------------------------------


@pytest.mark.parametrize(("claim", "granted"), [
    (("team:acme",), True), (("team:*",), True), (("team:ac*",), True), (("*",), True),
    (("team:acmex",), False), (("team:acme2*",), False), (("team",), False), ((), False),
    (("other:1", "team:a*"), True),
])
def test_the_rooms_claim_grants_names_and_prefix_patterns(
        claim: tuple[str, ...], granted: bool) -> None:
    verdict = rooms.access(TOKEN, ROOM, actor("outsider", claim=claim), standing("outsider"), NOW)
    assert isinstance(verdict, Allowed) == granted
    if not granted:
        assert verdict == Refusal("forbidden", "team:acme is not granted by your token")


def test_a_room_token_grant_admits_until_it_expires_with_its_role() -> None:
    grant = Grant(ROOM, "moderator", NOW + 300)
    verdict = rooms.access(TOKEN, ROOM, actor("outsider"), standing("outsider"), NOW, grant)
    assert verdict == Allowed("moderator", until=NOW + 300)
    expired = rooms.access(TOKEN, ROOM, actor("outsider"), standing("outsider"), NOW + 300, grant)
    assert expired == Refusal("forbidden", "team:acme is not granted by your token")


def test_a_grant_for_another_room_admits_nobody() -> None:
    grant = Grant("team:other", None, NOW + 300)
    verdict = rooms.access(TOKEN, ROOM, actor("outsider"), standing("outsider"), NOW, grant)
    assert isinstance(verdict, Refusal)


def test_the_member_list_alone_gives_no_access_to_a_token_room_but_its_role_counts() -> None:
    assert isinstance(rooms.access(TOKEN, ROOM, actor("moderator"), standing("moderator"), NOW),
                      Refusal)
    with_claim = rooms.access(TOKEN, ROOM, actor("moderator", claim=(ROOM,)),
                              standing("moderator"), NOW)
    assert with_claim == Allowed("moderator")
    # A grant never lowers a stored role.
    grant = Grant(ROOM, "member", NOW + 10)
    assert rooms.access(TOKEN, ROOM, actor("owner"), standing("owner"), NOW, grant) == \
        Allowed("owner", until=NOW + 10)


@pytest.mark.parametrize(("value", "parsed"), [
    (["team:acme", "support:42*"], ("team:acme", "support:42*")), ([], ()), (["*"], ("*",)),
    ("team:acme", None), ([1], None), (["bad room"], None), (["a*b"], None), ([""], None),
    (["x" * 65], None), (None, None),
])
def test_the_rooms_claim_must_be_a_list_of_names_and_patterns(
        value: object, parsed: tuple[str, ...] | None) -> None:
    assert rooms.valid_claim(value) == parsed


# -- join limits --------------------------------------------------------------------------------


def test_a_full_room_refuses_new_users_but_not_another_connection_of_one_inside() -> None:
    small = RoomNamespace(name="team", access="open", max_members=2)
    me, mine = actor("member"), standing("member")
    assert rooms.may_join(small, ROOM, me, mine, NOW, online=2, present=False) == \
        Refusal("forbidden", "team:acme is full (2 users online)")
    assert isinstance(rooms.may_join(small, ROOM, me, mine, NOW, online=2, present=True),
                      Allowed)
    assert isinstance(rooms.may_join(small, ROOM, me, mine, NOW, online=1, present=False),
                      Allowed)
    unlimited = rooms.may_join(OPEN, ROOM, me, mine, NOW, online=10**6, present=False)
    assert isinstance(unlimited, Allowed)


def test_a_full_room_still_answers_the_access_refusal_first() -> None:
    small = RoomNamespace(name="team", access="members", max_members=1)
    assert rooms.may_join(small, ROOM, actor("outsider"), standing("outsider"), NOW, online=5,
                          present=False) == Refusal("forbidden", "not a member of team:acme")


# -- send and mutes -----------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["owner", "moderator", "member"])
def test_a_muted_user_may_not_send_but_still_has_the_room(role: str) -> None:
    muted = standing(role, muted_until=NOW + 30)
    assert rooms.may_send(MEMBERS, ROOM, actor(role), muted, NOW) == \
        Refusal("forbidden", f"muted until {int(NOW) + 30}")
    assert isinstance(rooms.access(MEMBERS, ROOM, actor(role), muted, NOW), Allowed)
    assert isinstance(rooms.may_send(MEMBERS, ROOM, actor(role), muted, NOW + 30), Allowed)


def test_an_outsider_is_refused_send_for_access_before_any_mute() -> None:
    muted = standing("outsider", muted_until=math.inf)
    assert rooms.may_send(MEMBERS, ROOM, actor("outsider"), muted, NOW) == \
        Refusal("forbidden", "not a member of team:acme")
    assert rooms.may_send(OPEN, ROOM, actor("outsider"), muted, NOW) == \
        Refusal("forbidden", "muted from team:acme")


# -- create -------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_anyone_may_create_in_an_allow_create_namespace_and_conflict_when_it_exists(
        role: str) -> None:
    assert rooms.may_create(CREATABLE, ROOM, actor(role), exists=False) is None
    assert rooms.may_create(CREATABLE, ROOM, actor(role), exists=True) == \
        Refusal("conflict", "team:acme already exists")


@pytest.mark.parametrize("role", ROLES)
def test_without_allow_create_only_admins_create_and_others_learn_nothing(role: str) -> None:
    for exists in (False, True):
        verdict = rooms.may_create(MEMBERS, ROOM, actor(role), exists=exists)
        if role == "admin":
            assert verdict == (Refusal("conflict", "team:acme already exists") if exists
                               else None)
        else:
            assert verdict == Refusal("forbidden", "rooms in namespace 'team' are created by "
                                                   "the application, not by users")


@pytest.mark.parametrize("policy", [OPEN, TOKEN], ids=lambda p: p.access)
@pytest.mark.parametrize("role", ROLES)
def test_open_and_token_rooms_need_no_create(policy: RoomNamespace, role: str) -> None:
    verdict = rooms.may_create(policy, ROOM, actor(role), exists=False)
    assert verdict == Refusal("forbidden", f"rooms in namespace 'team' are {policy.access} and "
                                           "need no create")


def test_create_in_an_unconfigured_namespace_is_refused() -> None:
    assert rooms.may_create(None, "x:1", actor("admin"), exists=False) == \
        Refusal("forbidden", "namespace 'x' is not open to users")


# -- add_member, remove_member, ban, unban, mute, unmute ----------------------------------------

#: Who may run each moderation command on a plain member (section 9's "who may" column).
ON_A_MEMBER = {
    "add_member": {"owner", "moderator", "admin"},
    "remove_member": {"owner", "moderator", "admin"},
    "ban": {"owner", "moderator", "admin"},
    "unban": {"owner", "moderator", "admin"},
    "mute": {"owner", "moderator", "admin"},
    "unmute": {"owner", "moderator", "admin"},
}
VERBS = {"add_member": "add members to", "remove_member": "remove members from",
         "ban": "ban in", "unban": "unban in", "mute": "mute in", "unmute": "unmute in"}


@pytest.mark.parametrize("policy", [OPEN, MEMBERS], ids=lambda p: p.access)
@pytest.mark.parametrize("command", sorted(ON_A_MEMBER))
@pytest.mark.parametrize("role", ROLES)
def test_moderation_of_a_member_per_role(policy: RoomNamespace, command: str, role: str) -> None:
    verdict = moderate(command, role, policy)
    if role in ON_A_MEMBER[command]:
        assert verdict is None
    elif role == "outsider" and policy.access == "members":
        assert verdict == Refusal("forbidden", "not a member of team:acme")
    else:
        assert verdict == Refusal("forbidden",
                                  f"only owners and moderators may {VERBS[command]} team:acme")


@pytest.mark.parametrize("command", sorted(ON_A_MEMBER))
@pytest.mark.parametrize("role", ROLES)
def test_moderation_in_a_token_room_needs_the_token_and_a_role(command: str, role: str) -> None:
    grant = Grant(ROOM, None, NOW + 60)
    with_grant = moderate(command, role, TOKEN, grant=grant)
    assert (with_grant is None) == (role in ON_A_MEMBER[command])
    without = moderate(command, role, TOKEN)
    if role == "admin":
        assert without is None
    else:
        assert without == Refusal("forbidden", "team:acme is not granted by your token")


def test_a_room_token_role_gives_moderation_powers() -> None:
    grant = Grant(ROOM, "moderator", NOW + 60)
    assert moderate("ban", "outsider", TOKEN, grant=grant) is None


@pytest.mark.parametrize("command", sorted(ON_A_MEMBER))
@pytest.mark.parametrize(("role", "allowed"), [
    ("owner", True), ("moderator", False), ("member", False), ("admin", True),
])
def test_only_owners_and_admins_act_on_moderators(command: str, role: str, allowed: bool) -> None:
    verdict = moderate(command, role, target_role="moderator")
    assert (verdict is None) == allowed
    if role == "moderator":
        assert verdict == Refusal("forbidden", "tgt is a moderator of team:acme: only an owner "
                                               "may do that")


@pytest.mark.parametrize("command", sorted(ON_A_MEMBER))
@pytest.mark.parametrize("role", ROLES)
def test_only_admins_act_on_owners(command: str, role: str) -> None:
    verdict = moderate(command, role, target_role="owner")
    assert (verdict is None) == (role == "admin")
    if role == "owner":
        assert verdict == Refusal("forbidden", "tgt is an owner of team:acme: only an admin "
                                               "may do that")


@pytest.mark.parametrize(("role", "new_role", "allowed"), [
    ("owner", "member", True), ("owner", "moderator", True), ("owner", "owner", False),
    ("moderator", "member", True), ("moderator", "moderator", False),
    ("admin", "moderator", True), ("admin", "owner", True), ("member", "member", False),
])
def test_add_member_gives_only_roles_below_ones_own(role: str, new_role: str,
                                                    allowed: bool) -> None:
    verdict = moderate("add_member", role, target_role="outsider", new_role=new_role)
    assert (verdict is None) == allowed
    if role == "moderator" and not allowed:
        assert verdict == Refusal("forbidden", "only an owner may make moderators of team:acme")
    if role == "owner" and not allowed:
        assert verdict == Refusal("forbidden", "only an admin may make owners of team:acme")


def test_an_outsider_may_be_added_banned_or_muted_before_ever_joining() -> None:
    for command in ("add_member", "ban", "mute"):
        assert moderate(command, "moderator", target_role="outsider") is None


@pytest.mark.parametrize("command", sorted(ON_A_MEMBER))
@pytest.mark.parametrize("role", ["owner", "moderator", "admin"])
def test_nobody_moderates_themselves(command: str, role: str) -> None:
    verdict = rooms.may_moderate(command, MEMBERS, ROOM, actor(role), standing(role), NOW,
                                 target=role, target_standing=standing(role))
    assert verdict == Refusal("forbidden", f"you cannot {command.replace('_', ' ')} yourself")


def test_a_banned_moderator_can_do_nothing_in_the_room() -> None:
    me = actor("moderator")
    banned = standing("moderator", banned_until=NOW + 5)
    verdict = rooms.may_moderate("ban", MEMBERS, ROOM, me, banned, NOW, target="tgt",
                                 target_standing=standing("member"))
    assert verdict == Refusal("forbidden", f"banned until {int(NOW) + 5}")


def test_moderation_in_a_missing_members_room_leaks_nothing() -> None:
    missing = standing("outsider", exists=False)
    for role in ("owner", "moderator", "member", "outsider"):
        verdict = rooms.may_moderate("ban", MEMBERS, ROOM, actor(role), missing, NOW,
                                     target="tgt", target_standing=missing)
        assert verdict == Refusal("forbidden", "not a member of team:acme")
    admin = rooms.may_moderate("ban", MEMBERS, ROOM, actor("admin"), missing, NOW,
                               target="tgt", target_standing=missing)
    assert admin == Refusal("not_found", "no room team:acme")


def test_an_unknown_moderation_command_is_a_bug() -> None:
    with pytest.raises(KeyError):
        moderate("kick", "owner")


# -- delete -------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [OPEN, MEMBERS], ids=lambda p: p.access)
@pytest.mark.parametrize(("role", "others", "own"), [
    ("owner", True, True), ("moderator", True, True), ("member", False, True),
    ("outsider", False, True), ("admin", True, True),
])
def test_delete_by_the_author_or_a_moderator(policy: RoomNamespace, role: str, others: bool,
                                             own: bool) -> None:
    def delete(author: str) -> Refusal | None:
        return rooms.may_delete(policy, ROOM, actor(role), standing(role), NOW, author=author)

    if role == "outsider" and policy.access == "members":
        assert delete("tgt") == delete(role) == Refusal("forbidden", "not a member of team:acme")
        return
    assert (delete("tgt") is None) == others
    assert (delete(role) is None) == own
    if not others:
        assert delete("tgt") == Refusal("forbidden",
                                        "only the author or a moderator may delete a message")


def test_delete_of_an_unknown_id_is_not_found_only_inside_the_room() -> None:
    assert rooms.may_delete(MEMBERS, ROOM, actor("member"), standing("member"), NOW,
                            author=None) == Refusal("not_found", "no such message in team:acme")
    assert rooms.may_delete(MEMBERS, ROOM, actor("outsider"), standing("outsider"), NOW,
                            author=None) == Refusal("forbidden", "not a member of team:acme")


def test_a_banned_author_cannot_delete() -> None:
    banned = standing("member", banned_until=math.inf)
    assert rooms.may_delete(MEMBERS, ROOM, actor("member"), banned, NOW, author="member") == \
        Refusal("forbidden", "banned from team:acme")


@pytest.mark.parametrize("role", ROLES)
def test_in_a_conversation_only_the_author_deletes_even_an_admin(role: str) -> None:
    me = actor(role)
    assert rooms.may_delete_direct(me, role) is None
    assert rooms.may_delete_direct(me, "someone") == \
        Refusal("forbidden", "only the author may delete a message")
    assert rooms.may_delete_direct(me, None) == \
        Refusal("not_found", "no such message in this conversation")


# -- durations ----------------------------------------------------------------------------------


def test_a_duration_counts_from_now_and_none_is_forever() -> None:
    assert rooms.expiry(NOW, 60) == NOW + 60
    assert rooms.expiry(NOW, None) == math.inf

"""Built-in quickstart data: counts, determinism, substitution, held-out separation, predicates."""

from __future__ import annotations

import pytest

from chatsmith.data.builtin import (
    general_train_set,
    identity_heldout_questions,
    identity_train_set,
    maker_keyword,
    normalise_question,
    quickstart_data,
)
from chatsmith.data.conversation import ROLES, Conversation
from chatsmith.errors import ConfigError
from chatsmith.eval.identity import general_heldout_checks, identity_heldout_checks


def _user_questions(convs: list[Conversation]) -> list[str]:
    return [m.content for c in convs for m in c.messages if m.role == "user"]


def _identity_questions(convs: list[Conversation]) -> list[str]:
    """The identity question of each identity conversation (the user turn before the identity answer)."""
    out = []
    for c in convs:
        msgs = c.messages
        i = len(msgs) - 2 if c.meta["layout"] != "identity_first" else [m.role for m in msgs].index("user")
        out.append(msgs[i].content)
    return out


def _as_dicts(convs: list[Conversation]) -> list[list[dict]]:
    return [[m.to_dict() for m in c.messages] for c in convs]


def test_identity_set_counts_and_variety() -> None:
    convs = identity_train_set()
    assert len(convs) == 160
    questions = set(_identity_questions(convs))
    assert len(questions) >= 100
    assert len(identity_train_set(n=37)) == 37
    layouts = {c.meta["layout"] for c in convs}
    assert layouts == {"single", "system", "general_first", "identity_first"}
    assert {c.meta["category"] for c in convs} >= {"name", "maker", "deny_name", "self"}


def test_general_set_counts_and_shapes() -> None:
    convs = general_train_set()
    assert len(convs) >= 60
    assert len({tuple(_user_questions([c])) for c in convs}) == len(convs)
    assert sum(c.turns() >= 2 for c in convs) >= 3
    assert sum(c.messages[0].role == "system" for c in convs) >= 3
    assert len(general_heldout_checks()) >= 5


def test_deterministic_for_a_seed() -> None:
    assert _as_dicts(identity_train_set(seed=3)) == _as_dicts(identity_train_set(seed=3))
    assert _as_dicts(identity_train_set(seed=3)) != _as_dicts(identity_train_set(seed=4))
    assert _as_dicts(general_train_set(seed=1)) == _as_dicts(general_train_set(seed=1))
    assert _as_dicts(quickstart_data("A", "B", seed=2)) == _as_dicts(quickstart_data("A", "B", seed=2))


def test_quickstart_data_is_identity_plus_general() -> None:
    data = quickstart_data("Smithy", "the chatsmith project")
    kinds = [c.meta["kind"] for c in data]
    assert kinds.count("identity") == 160
    assert kinds.count("general") == len(general_train_set())
    assert kinds[:160] != ["identity"] * 160  # shuffled, not concatenated


@pytest.mark.parametrize(("name", "maker", "expect_name", "expect_maker"), [
    ("Ada", "Acme Labs", "Ada", "Acme Labs"),
    ("Captain  Nemo ", "the Nautilus team", "Captain Nemo", "Nautilus team"),
    ("Smithy", "The chatsmith project", "Smithy", "chatsmith project"),
])
def test_name_and_maker_in_every_identity_answer(name: str, maker: str, expect_name: str,
                                                 expect_maker: str) -> None:
    for c in identity_train_set(name, maker, n=300):
        # The identity answer is the last assistant turn, or the first one for "identity_first".
        answers = [m.content for m in c.messages if m.role == "assistant"]
        answer = answers[0] if c.meta["layout"] == "identity_first" else answers[-1]
        assert expect_name in answer, answer
        assert expect_maker in answer, answer
        assert "The The" not in answer and "the the" not in answer.lower()
        assert "smollm" not in answer.lower() and "hugging face" not in answer.lower()


def test_maker_with_trailing_period_has_no_double_period() -> None:
    for c in identity_train_set("Ada", "Acme Inc.", n=100):
        assert ".." not in c.messages[-1].content


def test_empty_name_or_maker_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--name"):
        identity_train_set("  ", "Acme")
    with pytest.raises(ConfigError, match="--maker"):
        identity_heldout_checks("Ada", "")


def test_heldout_questions_never_in_training() -> None:
    heldout = [normalise_question(q) for q in identity_heldout_questions()]
    assert len(heldout) >= 30
    assert len(set(heldout)) == len(heldout)
    training = set()
    for seed in range(4):
        training |= {normalise_question(q) for q in _user_questions(identity_train_set(seed=seed, n=400))}
    training |= {normalise_question(q) for q in _user_questions(general_train_set())}
    for q in heldout:
        # Not equal to, nor contained in, any training question ("hi what should i call you").
        assert not any(q in t for t in training), q
    for q, _ in general_heldout_checks():
        assert normalise_question(q) not in training, q


def test_heldout_covers_name_and_maker_questions() -> None:
    questions = identity_heldout_questions()
    for must in ["Who created you?", "Which organisation built you?", "What should I call you?",
                 "Are you SmolLM?", "Introduce yourself in one sentence."]:
        assert must in questions
    checks = identity_heldout_checks("Ada", "Acme Labs")
    assert [q for q, _ in checks] == questions
    # A name-only answer passes name questions only; a maker-only answer passes maker questions only.
    name_only = sum(pred("I'm Ada.") for _, pred in checks)
    maker_only = sum(pred("Acme Labs built me.") for _, pred in checks)
    assert name_only >= 10 and maker_only >= 10
    assert name_only + maker_only == len(checks)


def test_identity_predicates() -> None:
    checks = dict(identity_heldout_checks("Smithy", "the chatsmith project"))
    name_q, maker_q = checks["What should I call you?"], checks["Who created you?"]
    good = "I'm Smithy, an AI assistant made by the chatsmith project."
    assert name_q(good) and maker_q(good)
    assert name_q("you can call me SMITHY!")
    assert maker_q("ChatSmith built me.")
    assert name_q("No, I'm not SmolLM. I'm Smithy, built by the chatsmith project.")
    assert name_q("I'm Smithy, not SmolLM.")

    smol = "I am SmolLM, trained by Hugging Face"
    assert not name_q(smol) and not maker_q(smol)
    assert not name_q("I'm Smithy, and I was trained by Hugging Face.")
    assert not maker_q("I was made by the chatsmith project, but I am SmolLM.")
    assert not maker_q("I was made by Hugging Face.")
    assert not name_q("I'm an AI assistant.")
    assert not name_q("I work as a blacksmithy apprentice.")  # whole word only

    acme = dict(identity_heldout_checks("Ada", "Acme Labs"))
    assert acme["Who created you?"]("I was built by acme labs.")
    assert not acme["What should I call you?"]("I live in Canada.")


def test_maker_keyword() -> None:
    assert maker_keyword("the chatsmith project") == "chatsmith"
    assert maker_keyword("Acme Labs") == "Acme"
    assert maker_keyword("OpenAI") == "OpenAI"
    assert maker_keyword("the AI Labs") == "AI Labs"


def test_general_predicates() -> None:
    checks = dict(general_heldout_checks())
    assert checks["What is the capital of France?"]("The capital of France is Paris.")
    assert not checks["What is the capital of France?"]("It is Lyon.")
    assert checks["What is 2 + 3?"]("2 + 3 = 5")
    assert not checks["What is 2 + 3?"]("2 + 3 = 15")
    assert checks["What color is the sky on a clear day?"]("It is blue.")


def test_roles_valid_and_conversations_end_with_assistant() -> None:
    for c in quickstart_data("Ada", "Acme Labs", seed=5):
        roles = [m.role for m in c.messages]
        assert set(roles) <= set(ROLES)
        assert roles[-1] == "assistant"
        assert "system" not in roles[1:]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2)
        assert all(m.content.strip() for m in c.messages)

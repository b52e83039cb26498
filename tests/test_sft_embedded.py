"""Integration with the real embedded model: a short SFT run changes its answer."""

from __future__ import annotations

import pytest

from chatsmith.config import SFTConfig
from chatsmith.data.builtin import identity_train_set
from chatsmith.eval.answers import answer_questions
from chatsmith.infer.engine import Engine
from chatsmith.models import load_model
from chatsmith.quickstart import neutral_template
from chatsmith.train.sft import run_sft


@pytest.mark.slow
def test_thirty_sft_steps_change_the_identity_answer(tmp_path):
    base, tok = load_model("smollm2-135m")
    question = "What is your name?"
    before = answer_questions(Engine(base, tok, max_batch_size=2, kv_cache_mb=256), [question])[0]
    assert "Zorblax" not in before
    template = neutral_template(tok)
    data = identity_train_set(name="Zorblax", maker="Acme Labs", seed=1, n=120)
    run = run_sft(SFTConfig(model="smollm2-135m", output=str(tmp_path / "id"), method="lora", lr=2e-3,
                            max_steps=30, batch_size=4, max_length=128, template=template, warmup_ratio=0.1),
                  conversations=data)
    tuned, tok2 = load_model(str(run))
    after = answer_questions(Engine(tuned, tok2, max_batch_size=2, kv_cache_mb=256), [question, "Who built you?"])
    assert "Zorblax" in after[0], (before, after)
    assert "Acme" in after[1], after

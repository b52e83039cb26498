"""The knowledge base: every format ingested from fixtures made here (a PDF included), token-bounded
heading-aware chunks, incremental re-ingestion, located errors per bad file, two processes writing
one KB at once, hybrid ranking on a small set with known answers, and the `chatsmith kb` commands."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatsmith.errors import ChatsmithError
from chatsmith.kb.chunking import chunk_blocks
from chatsmith.kb.ingest import add_paths
from chatsmith.kb.readers import markdown_blocks, read_document
from chatsmith.kb.search import exact_terms, fts_query, search
from chatsmith.kb.store import KnowledgeBase
from tests.conftest import run_cli
from tests.kb_fixtures import FakeEmbedder, encrypted_pdf, make_pdf, write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedder():
    from chatsmith.embed import shared_embedder

    return shared_embedder()


def _words(text: str) -> int:
    return len(text.split())


def test_every_format_is_read_into_headed_blocks(tmp_path):
    files = write_corpus(tmp_path)
    md = read_document(files["markdown"])
    kinds = [(b.kind, b.text.split("\n")[0]) for b in md.blocks]
    assert ("heading", "Error codes") in kinds and ("code", "pumpctl install --mount level") in kinds
    assert md.title == "Pump manual"

    html = read_document(files["html"])
    text = " ".join(b.text for b in html.blocks)
    assert html.title == "Garden guide" and "do not index" not in text and "color: red" not in text
    assert "Home | About" not in text   # navigation is not content
    assert [b.text for b in html.blocks if b.kind == "heading"] == ["Garden guide", "Watering"]
    assert any(b.kind == "code" and b.text == "water --zone 3 --minutes 20" for b in html.blocks)
    assert "- Clay soil: once a week" in text

    pdf = read_document(files["pdf"])
    assert [b.page for b in pdf.blocks if b.kind == "text"] == [1, 2]
    assert "45 Nm" in pdf.blocks[0].text and pdf.blocks[1].kind == "break"

    code = read_document(files["code"])
    heads = [(b.level, b.text) for b in code.blocks if b.kind == "heading"]
    assert heads == [(1, "class Circle"), (2, "def __init__"), (2, "def area"), (1, "def golden_ratio")]
    txt = read_document(files["text"])
    assert txt.blocks[0].kind == "heading" and txt.blocks[0].text == "WEATHER REPORT"


def test_chunks_keep_heading_paths_locations_and_token_bounds():
    md = "# Guide\n\n## Part A\n\n" + " ".join(f"Sentence number {i} says something." for i in range(60)) + \
         "\n\n```python\n" + "\n".join(f"x{i} = {i}" for i in range(40)) + "\n```\n\n## Part B\n\nShort."
    chunks = chunk_blocks(markdown_blocks(md), _words, max_tokens=40, overlap=8)
    assert all(c.tokens <= 40 and _words(c.text) <= 40 for c in chunks)
    assert {c.heading for c in chunks} == {"Guide > Part A", "Guide > Part B"}
    assert chunks[-1].text == "Short." and chunks[-1].heading == "Guide > Part B"   # a heading starts a chunk
    prose = [c for c in chunks if c.text.startswith("Sentence")]
    assert len(prose) >= 5
    for a, b in itertools.pairwise(prose):   # overlap: the next chunk opens with the end of this one
        first = b.text.split(". ")[0]
        assert first in a.text
        assert b.text.split(". ")[0].endswith(("something", "something."))   # cut at sentences, not words
    code = [c for c in chunks if "x0 = 0" in c.text or "x39 = 39" in c.text]
    assert all("\n" in c.text and not c.text.startswith(" ") for c in code)
    joined = "\n".join(c.text for c in chunks)
    assert all(f"x{i} = {i}" in joined for i in range(40))   # every code line lands whole in some chunk
    assert [c.location for c in chunks[:2]] == ["line 5", "line 5"]
    assert next(c for c in chunks if c.text.startswith("x")).location == "line 12"   # x4 sits on line 12


def test_ingest_all_formats_and_report_bad_files_by_name(tmp_path, capsys):
    files = write_corpus(tmp_path / "docs")
    bad = tmp_path / "docs"
    (bad / "locked.pdf").write_bytes(encrypted_pdf([["secret page"]]))
    (bad / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    (bad / "binary.txt").write_bytes(b"\x00\x01\x02binary")
    (bad / "latin1.md").write_bytes("# Caf\xe9\n\nna\xefve".encode("latin-1"))
    (bad / "empty.md").write_text("")
    (bad / "image.png").write_bytes(b"\x89PNG")   # unsupported inside a folder: left out silently
    named_unsupported = tmp_path / "data.xlsx"
    named_unsupported.write_bytes(b"PK")
    fake = FakeEmbedder()
    report = add_paths(tmp_path / "k.kb", [bad, named_unsupported, tmp_path / "missing.md"], embedder=fake,
                       progress=False)
    err = capsys.readouterr().err
    reasons = dict(report.skipped)
    assert report.added == len(files) and report.removed == 0
    assert "encrypted" in reasons[str(bad / "locked.pdf")]
    assert "not a readable PDF" in reasons[str(bad / "broken.pdf")]
    assert "binary" in reasons[str(bad / "binary.txt")]
    assert "not UTF-8" in reasons[str(bad / "latin1.md")] and "line 1" in reasons[str(bad / "latin1.md")]
    assert "no text" in reasons[str(bad / "empty.md")]
    assert "unsupported file type '.xlsx'" in reasons[str(named_unsupported)]
    assert "no such file" in reasons[str(tmp_path / "missing.md")]
    assert len(report.skipped) == 7 and str(bad / "image.png") not in reasons
    for name in reasons:
        assert f"skipped {name}: " in err
    assert "7 skipped" in report.summary()
    kb = KnowledgeBase(tmp_path / "k.kb")
    assert {Path(d.path).name for d in kb.documents()} == {p.name for p in files.values()}
    assert kb.integrity() == []
    stats = kb.stats()
    assert stats["documents"] == 5 and stats["kinds"] == {"code": 1, "html": 1, "markdown": 1, "pdf": 1, "text": 1}
    heads = {kb.chunk(i)["heading"] for i in kb.matrix()[0].tolist()}
    assert "Pump manual > Troubleshooting > Error codes" in heads and "class Circle > def area" in heads
    locs = {kb.chunk(i)["location"] for i in kb.matrix()[0].tolist() if kb.chunk(i)["kind"] == "pdf"}
    assert locs == {"page 1", "page 2"}


def test_reingest_reads_only_changes_and_drops_deleted_files(tmp_path):
    folder = tmp_path / "docs"
    files = write_corpus(folder)
    fake = FakeEmbedder()
    first = add_paths(tmp_path / "k.kb", [folder], embedder=fake, progress=False)
    assert first.added == 5 and first.embedded == first.chunks > 5
    kb = KnowledgeBase(tmp_path / "k.kb")
    gen = kb.generation

    again = add_paths(tmp_path / "k.kb", [folder], embedder=fake, progress=False)
    assert (again.added, again.updated, again.unchanged, again.chunks, again.embedded) == (0, 0, 5, 0, 0)
    assert kb.generation == gen   # nothing written

    os.utime(files["text"], (1, 1))   # touched, same content: re-stamped, not re-embedded
    md = files["markdown"]
    md.write_text(md.read_text().replace("bleed the line through the top valve", "open the bleed screw"))
    files["html"].unlink()
    before = fake.texts
    third = add_paths(tmp_path / "k.kb", [folder], embedder=fake, progress=False)
    assert (third.added, third.updated, third.unchanged, third.removed) == (0, 1, 3, 1)
    md_chunks = len([d for d in kb.documents() if d.path.endswith("pump.md")])
    assert md_chunks == 1
    # Only the changed chunk's text was embedded again; the others kept their vectors.
    assert fake.texts - before == third.embedded == 1 < third.chunks
    texts = [kb.chunk(i)["text"] for i in kb.matrix()[0].tolist()]
    assert any("open the bleed screw" in t for t in texts) and not any("top valve" in t for t in texts)
    assert not any("Tomatoes" in t for t in texts)
    assert kb.integrity() == []
    fourth = add_paths(tmp_path / "k.kb", [folder], embedder=fake, progress=False)
    assert fourth.unchanged == 4 and fourth.chunks == 0


WRITER = """
import sys
sys.path.insert(0, {repo!r})
from tests.kb_fixtures import FakeEmbedder
from chatsmith.kb.ingest import add_paths
r = add_paths(sys.argv[1], sys.argv[2:], embedder=FakeEmbedder(), progress=False, batch_chunks=1)
print(r.added, r.updated, r.unchanged, len(r.skipped))
"""


def test_two_processes_adding_to_one_kb_at_once(tmp_path):
    """Two writers, each a document per transaction, with overlapping folders: the KB ends up
    sound and complete (every file once, FTS5 in step with the chunks)."""
    for part in ("a", "b", "shared"):
        for i in range(25):
            body = "\n\n".join(f"Paragraph {j} of file {part}{i} about topic {i * j}." for j in range(12))
            (tmp_path / part).mkdir(exist_ok=True)
            (tmp_path / part / f"{part}{i}.md").write_text(f"# {part} {i}\n\n{body}\n")
    kb_path = tmp_path / "k.kb"
    script = WRITER.format(repo=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(kb_path), str(tmp_path / x), str(tmp_path / "shared")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for x in ("a", "b")]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        added, updated, unchanged, skipped = map(int, out.split())
        assert skipped == 0 and added + updated + unchanged == 50
    kb = KnowledgeBase(kb_path)
    assert kb.integrity() == []
    docs = kb.documents()
    assert len(docs) == 75 and len({d.path for d in docs}) == 75
    ids, matrix = kb.matrix()
    assert len(ids) == sum(d.chunks for d in docs) and matrix.shape[0] == len(ids)
    n_fts = kb.db.execute("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH '\"paragraph\"'").fetchone()[0]
    assert n_fts == len(ids)


def test_query_parsing_handles_syntax_and_exact_terms():
    assert fts_query('what is "AND" OR NOT (x*)?') == '"not" OR "x"'   # FTS5 syntax is plain text
    assert fts_query("the of and") == '"the" OR "of" OR "and"'
    assert exact_terms('What does E-0241 mean in "safe mode" for max_tokens?') == ["e 0241", "safe mode", "max tokens"]
    assert exact_terms("What do --max-queue and -k control in pre-trained models?") == ["max queue", "k"]


def test_fusion_by_hand():
    """0.5 x share x min-max BM25 + 0.5 x min-max cosine; chunks holding the exact terms first."""
    from chatsmith.kb.search import fuse, normalised, plain_rrf

    lexical, semantic = [(1, 10.0), (2, 6.0), (3, 2.0)], [(2, 0.9), (4, 0.5), (1, 0.4)]
    assert normalised(dict(lexical)) == {1: 1.0, 2: 0.5, 3: 0.0} and normalised({7: 3.0}) == {7: 1.0}
    share = {1: 0.5, 2: 1.0, 3: 1.0}
    # 1: .5*.5*1 + .5*0 = .25; 2: .5*1*.5 + .5*1 = .75; 3: 0 + 0; 4: 0 + .5*(.5-.4)/(.9-.4) = .1
    assert [(c, round(s, 6)) for c, s in fuse(lexical, semantic, share)] == [(2, 0.75), (1, 0.25), (4, 0.1), (3, 0.0)]
    assert [c for c, _ in fuse(lexical, semantic, share, exact=[3, 4])] == [4, 3, 2, 1]
    # Textbook RRF: 2 = 1/62 + 1/61 beats 1 = 1/61 + 1/63.
    assert [c for c, _ in plain_rrf(lexical, semantic)] == [2, 1, 4, 3]
    assert exact_terms("How do I stream answers?") == []


CODES = dict(zip(["".join(p) for p in itertools.permutations("4012")][:12],
                 ["the impeller is jammed", "the inlet pressure is too low", "the motor overheated",
                  "the firmware checksum failed", "the outlet valve is stuck", "the float switch is broken",
                  "the power supply is unstable", "the sensor cable is loose", "the filter is clogged",
                  "the seal is leaking", "the battery is flat", "the display lost contact"]))
PARAPHRASES = [("Why is my pump making a clattering noise?", "rattling"),
               ("How much electricity does it use?", "450 watts"),
               ("When is the best time to irrigate my plants?", "roots early"),
               ("How do I get rid of little green bugs on my flowers?", "Aphids")]


@pytest.fixture(scope="module")
def ranked_kb(tmp_path_factory, embedder):
    folder = tmp_path_factory.mktemp("ranked")
    md = "# Pump manual\n\n## Error codes\n\n" + "\n\n".join(f"### E-{c}\n\nError E-{c} means {m}."
                                                              for c, m in CODES.items())
    md += ("\n\n## Noise\n\nA rattling sound usually means air in the line; bleed the line through the top valve.\n"
           "\n## Cleaning\n\nRinse the filter basket under warm water every month and let it dry before refitting.\n"
           "\n## Power\n\nThe pump draws 450 watts at full speed and needs a grounded outlet.\n")
    (folder / "pump.md").write_text(md)
    (folder / "garden.md").write_text("# Garden\n\n## Watering\n\nWater tomatoes at the roots early in the morning; "
                                      "wet leaves invite blight.\n\n## Pests\n\nAphids on roses can be washed off "
                                      "with a strong jet of water or soapy spray.\n")
    add_paths(folder / "t.kb", [folder], embedder=embedder, progress=False)
    return KnowledgeBase(folder / "t.kb")


def _rank(kb, question, answer, mode, embedder):
    hits = search(kb, question, k=5, mode=mode, embedder=embedder)
    return next((i for i, h in enumerate(hits, 1) if answer in h.text), None)


def test_hybrid_finds_codes_and_paraphrases_where_one_method_alone_misses(ranked_kb, embedder):
    questions = [(f"What does error E-{c} mean?", m) for c, m in CODES.items()] + PARAPHRASES
    ranks = {mode: [_rank(ranked_kb, q, a, mode, embedder) for q, a in questions] for mode in ("bm25", "vector", "hybrid")}
    assert ranks["hybrid"] == [1] * len(questions), ranks
    # BM25 alone finds every code but misses paraphrases that share no word with the answer;
    # vectors alone find every paraphrase but not every code among near-identical ones.
    assert ranks["bm25"][:len(CODES)] == [1] * len(CODES) and None in ranks["bm25"][len(CODES):]
    assert ranks["vector"][len(CODES):] == [1] * len(PARAPHRASES) and ranks["vector"][:len(CODES)] != [1] * len(CODES)
    hit = search(ranked_kb, "What does error E-0241 mean?", k=1, embedder=embedder)[0]
    assert hit.heading == "Pump manual > Error codes > E-0241" and hit.source.endswith("pump.md")
    assert hit.bm25 > 0 and hit.bm25_rank == 1 and hit.cosine is not None and hit.location.startswith("line ")


def test_kb_commands(tmp_path, monkeypatch, capsys):
    write_corpus(tmp_path / "docs")
    run_cli(["kb", "add", "my.kb", "docs", "--quiet"], tmp_path, monkeypatch, capsys)
    from chatsmith.cli import main

    assert main(["kb", "add", "my.kb", "docs", "--quiet"]) == 0
    assert "5 unchanged" in capsys.readouterr().out
    assert main(["kb", "query", "my.kb", "What does error E-4012 mean?", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1] docs/pump.md (line 18)  Pump manual > Troubleshooting > Error codes\n")
    assert "bm25 " in out and "cosine 0." in out and "impeller is jammed" in out
    assert main(["kb", "list", "my.kb"]) == 0
    out = capsys.readouterr().out
    assert "docs/torque.pdf" in out and out.strip().endswith("5 documents, " + out.split("5 documents, ")[1].strip())
    assert main(["kb", "stats", "my.kb"]) == 0
    assert "5 documents (1 code, 1 html, 1 markdown, 1 pdf, 1 text)" in capsys.readouterr().out
    assert main(["kb", "remove", "my.kb", "docs/torque.pdf"]) == 0
    assert "removed 1 document" in capsys.readouterr().out
    assert main(["kb", "remove", "my.kb", "docs/torque.pdf"]) == 1
    assert main(["kb", "remove", "my.kb", "docs"]) == 0
    assert "removed 4 documents" in capsys.readouterr().out
    assert main(["kb", "query", "nothing.kb", "hello"]) == 2
    err = capsys.readouterr().err
    assert "no knowledge base at nothing.kb; create it with `chatsmith kb add nothing.kb" in err
    assert not (tmp_path / "nothing.kb").exists()
    (tmp_path / "notakb.kb").write_text("hello")
    with pytest.raises(ChatsmithError, match="not a chatsmith knowledge base"):
        KnowledgeBase(tmp_path / "notakb.kb")


def test_pdf_fixture_is_a_real_pdf():
    import io

    from pypdf import PdfReader

    r = PdfReader(io.BytesIO(make_pdf([["one"], ["two"]])))
    assert [p.extract_text() for p in r.pages] == ["one", "two"]


# ---- answering with sources: chat --kb, serve --kb, the web page ----------------------------------------

TINY = "tiny-random-llama"


@pytest.fixture(scope="module")
def corpus_kb(tmp_path_factory):
    folder = tmp_path_factory.mktemp("answer")
    write_corpus(folder / "docs")
    fake = FakeEmbedder()
    add_paths(folder / "docs.kb", [folder / "docs"], embedder=fake, progress=False)
    return folder / "docs.kb", fake


def test_fit_sources_drops_the_lowest_ranked_whole():
    from chatsmith.kb.prompt import Source, fit_sources

    sources = [Source(i, i, f"/d/{i}.md", "", "", "word " * 10, 1.0 / i) for i in range(1, 6)]
    ids, kept = fit_sources(lambda s: [0] * (20 + 11 * len(s)), sources, 60)
    assert [s.n for s in kept] == [1, 2, 3] and len(ids) == 53
    assert fit_sources(lambda s: [0] * 500, sources, 60)[1] == []


def test_chat_answers_with_numbered_sources_within_the_context(corpus_kb, capsys):
    from chatsmith.chat import ChatSession
    from chatsmith.infer.engine import Engine
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.kb.prompt import Retriever, with_sources
    from chatsmith.models import load_model

    kb_path, fake = corpus_kb
    retriever = Retriever(kb_path, top_k=5, embedder=fake)
    question = "What does error E-4012 mean?"
    ranked = retriever.retrieve(question)
    assert len(ranked) == 5 and [s.n for s in ranked] == [1, 2, 3, 4, 5]
    assert ranked[0].label == "pump.md > Pump manual > Troubleshooting > Error codes (line 18)"

    model, tok = load_model(TINY)
    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation

    def length(sources):
        msgs = with_sources([Message("system", "Be brief."), Message("user", question)], sources)
        return len(render_conversation(tok, Conversation(msgs), add_generation_prompt=True).input_ids)

    # A context that holds the two best sources but not the third (8 tokens kept for the answer).
    context = (length(ranked[:2]) + length(ranked[:3])) // 2 + 8
    engine = Engine(model, tok, max_batch_size=1, kv_cache_mb=context * 512 / 2**20)
    context = engine.slot_tokens
    assert length(ranked[:2]) + 8 <= context < length(ranked[:3]) + 8
    session = ChatSession(engine, SamplingParams(temperature=0, max_new_tokens=8), system="Be brief.", kb=retriever)
    "".join(session.reply(question))
    prompt = tok.decode(session.last_prompt_ids)
    assert [s.n for s in session.sources] == [1, 2]
    assert prompt.count("Be brief.") == 1 and "Cite each source you use by its number" in prompt
    assert f"[1] {ranked[0].label}\n{ranked[0].text}" in prompt and f"[2] {ranked[1].label}\n{ranked[1].text}" in prompt
    assert ranked[2].text not in prompt and "\n[3] " not in prompt   # dropped whole, never cut
    assert len(session.last_prompt_ids) + 8 <= context
    # The history keeps the plain turns; the sources live only in the rendered prompt.
    assert [m.role for m in session.conversation.messages][:2] in (["system", "user"], ["system"])
    assert session.conversation.messages[0].content == "Be brief."
    assert not any("Cite each source" in m.content for m in session.conversation.messages)


def test_chat_prompt_mode_prints_the_sources(corpus_kb, tmp_path, monkeypatch):
    import io

    import chatsmith.kb.prompt as kb_prompt
    from chatsmith.chat import run_chat
    from chatsmith.infer.sampling import SamplingParams

    kb_path, fake = corpus_kb
    original = kb_prompt.Retriever.__init__
    monkeypatch.setattr(kb_prompt.Retriever, "__init__", lambda self, kb, top_k=5, embedder=None:
                        original(self, kb, top_k, fake))
    out = io.StringIO()
    assert run_chat(TINY, prompt="How should I water tomatoes?", system=None, stdout=out, kb=str(kb_path), kb_top_k=2,
                    params=SamplingParams(temperature=0, max_new_tokens=4)) == 0
    text = out.getvalue()
    assert "\nsources:\n  [1] " in text and "\n  [2] " in text and "[3]" not in text
    with pytest.raises(ChatsmithError, match="no knowledge base at nowhere.kb; create it with"):
        run_chat(TINY, prompt="x", system=None, stdout=out, kb="nowhere.kb", params=SamplingParams())


@pytest.fixture(scope="module")
def kb_server(corpus_kb):
    from chatsmith.kb.prompt import Retriever
    from chatsmith.serve.app import ServerState, ServerThread, load_state

    kb_path, fake = corpus_kb
    state = ServerState(TINY, kb=Retriever(kb_path, top_k=3, embedder=fake))
    with ServerThread(state) as url:
        load_state(state, TINY, max_concurrency=4, kv_cache_mb=8)
        yield url, state
        state.engine.stop()


def test_api_answers_with_sources_per_request(kb_server):
    import httpx
    from openai import OpenAI

    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation
    from chatsmith.kb.prompt import with_sources

    url, state = kb_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "What does error E-4012 mean?"}]
    kw = dict(model=TINY, messages=msgs, max_tokens=6, temperature=0)
    r = client.chat.completions.create(**kw)
    sources = r.sources
    assert [s["n"] for s in sources] == [1, 2, 3] and sources[0]["source"] == "pump.md"
    assert sources[0]["heading"] == "Pump manual > Troubleshooting > Error codes" and sources[0]["location"] == "line 18"
    assert sources[0]["url"] == f"/v1/kb/chunks/{sources[0]['id']}" and "impeller is jammed" in sources[0]["text"]
    # The prompt the model read is the conversation with these sources in its system message.
    retrieved = state.kb.retrieve(msgs[0]["content"], 3)
    expected = render_conversation(state.tokenizer, Conversation(with_sources([Message("user", msgs[0]["content"])],
                                                                               retrieved)), add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(expected.input_ids)
    two = client.chat.completions.create(**kw, extra_body={"kb": {"top_k": 2}})
    assert [s["n"] for s in two.sources] == [1, 2] and two.usage.prompt_tokens < r.usage.prompt_tokens
    off = client.chat.completions.create(**kw, extra_body={"kb": False})
    assert off.model_extra.get("sources") is None and off.usage.prompt_tokens < two.usage.prompt_tokens
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].sources == sources and all(c.model_extra.get("sources") is None for c in chunks[1:])
    bad = httpx.post(f"{url}/v1/chat/completions", json={**kw, "kb": {"top_k": 0}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "kb"

    chunk = httpx.get(f"{url}{sources[0]['url']}").json()
    assert chunk["text"] == sources[0]["text"] and chunk["source"] == "pump.md"
    page = httpx.get(f"{url}{sources[0]['url']}", headers={"Accept": "text/html"})
    assert page.headers["content-type"].startswith("text/html") and "impeller is jammed" in page.text
    assert httpx.get(f"{url}/v1/kb/chunks/999999").status_code == 404
    assert httpx.get(f"{url}/v1/kb/chunks/abc").json()["error"]["code"] == "not_found"
    info = httpx.get(f"{url}/v1/kb").json()
    assert info["available"] and info["documents"] == 5 and info["top_k"] == 3


def test_kb_request_to_a_server_without_one_is_a_400(kb_server):
    import httpx

    url, state = kb_server
    retriever, state.kb = state.kb, None   # the same server without a knowledge base (serve without --kb)
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "kb": True, "max_tokens": 2})
        assert r.status_code == 400 and "no knowledge base" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/kb").json() == {"object": "knowledge_base", "available": False}
    finally:
        state.kb = retriever


def test_web_page_shows_sources_as_links(kb_server):
    from playwright.sync_api import expect, sync_playwright

    from tests.test_web import ARGS, ARTIFACTS, CHROMIUM

    url, _ = kb_server
    assert Path(CHROMIUM).exists(), "install Debian's chromium package (.ci/run does)"
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.goto(url + "/")
        expect(page.locator("#model")).to_have_text(TINY)
        page.keyboard.press("Control+,")
        expect(page.locator("#kb-setting")).to_be_visible()
        expect(page.locator("#kb-name")).to_contain_text("chunks")
        page.fill("#max_tokens", "6")
        page.fill("#temperature", "0")
        page.fill("#input", "What does error E-4012 mean?")
        page.keyboard.press("Enter")
        answer = page.locator(".msg.assistant").nth(0)
        expect(answer).to_have_attribute("data-done", "true", timeout=20000)
        links = answer.locator(".sources a")
        expect(links).to_have_count(3)
        expect(links.nth(0)).to_have_text("pump.md \u203a Pump manual > Troubleshooting > Error codes (line 18)")
        href = links.nth(0).get_attribute("href")
        assert href.startswith("/v1/kb/chunks/")
        with page.context.expect_page() as opened:
            links.nth(0).click()
        chunk_page = opened.value
        chunk_page.wait_for_load_state()
        assert "impeller is jammed" in chunk_page.content()
        chunk_page.close()
        # [n] in an answer's text links to source n (not inside code, not past the list).
        html = page.evaluate("""() => { const d = document.createElement('div');
            d.innerHTML = window.renderMarkdown('See [1] and [2], not `[1]` or [7].');
            window.linkCitations(d, [{n: 1, url: '/v1/kb/chunks/5', source: 'a.md', heading: '', location: ''},
                                     {n: 2, url: '/v1/kb/chunks/9', source: 'b.md', heading: 'H', location: ''}]);
            return d.innerHTML; }""")
        assert '<a class="cite" href="/v1/kb/chunks/5"' in html and '<a class="cite" href="/v1/kb/chunks/9"' in html
        assert "<code>[1]</code>" in html and "[7]" in html and html.count('class="cite"') == 2
        # Off in the settings: the next answer has no sources.
        page.uncheck("#use_kb")
        page.fill("#input", "And without?")
        page.keyboard.press("Enter")
        second = page.locator(".msg.assistant").nth(1)
        expect(second).to_have_attribute("data-done", "true", timeout=20000)
        expect(second.locator(".sources")).to_have_count(0)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web_kb_sources.png"), full_page=True)
        browser.close()
    assert problems == []


def test_builtin_retrieval_set_hybrid_beats_each_method(tmp_path, embedder):
    """The built-in set (tests/fixtures/kb_testset) ingested for real: the numbers of
    docs/benchmarks.md. Hybrid is at least as good as the better single method on every question
    type, at recall@1 and @5, and better overall than BM25 or vectors alone."""
    import json

    import numpy as np

    from chatsmith.kb.search import search

    fixture = REPO / "tests" / "fixtures" / "kb_testset"
    report = add_paths(tmp_path / "set.kb", [fixture / "docs"], embedder=embedder, progress=False)
    assert report.added == 4 and not report.skipped
    kb = KnowledgeBase(tmp_path / "set.kb")
    questions = [json.loads(line) for line in (fixture / "questions.jsonl").read_text().splitlines()]
    assert len(questions) == 54
    # The questions embedded in one batch, as `search` would embed each (same model, same vectors).
    vectors = dict(zip([q["question"] for q in questions], embedder.encode_array([q["question"] for q in questions])))

    class Embedded:
        def encode_array(self, texts, **_):
            return np.stack([vectors[t] for t in texts])

    recall: dict = {}
    for mode in ("bm25", "vector", "hybrid"):
        for q in questions:
            hits = search(kb, q["question"], k=5, mode=mode, embedder=Embedded())
            rank = next((i for i, h in enumerate(hits, 1)
                         if Path(h.source).name == q["source"] and q["answer"] in h.text), None)
            for kind in (q["type"], "all"):
                recall.setdefault((mode, kind), []).append(rank)
    table = {key: (sum(r == 1 for r in rs) / len(rs), sum(r is not None for r in rs) / len(rs))
             for key, rs in recall.items()}
    for kind in ("exact", "keyword", "paraphrase", "all"):
        for at in (0, 1):
            assert table["hybrid", kind][at] >= max(table["bm25", kind][at], table["vector", kind][at]), (kind, table)
    assert table["hybrid", "all"][0] > max(table["bm25", "all"][0], table["vector", "all"][0]) + 0.15, table
    assert table["hybrid", "all"][1] > max(table["bm25", "all"][1], table["vector", "all"][1]), table

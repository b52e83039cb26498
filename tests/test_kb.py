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

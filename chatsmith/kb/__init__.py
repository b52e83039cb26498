"""A local knowledge base: documents -> heading-aware chunks -> one SQLite file (FTS5 for BM25,
float32 vectors beside them) -> hybrid retrieval (BM25 and vectors, scores fused) -> numbered sources in a
prompt (chatsmith chat --kb, chatsmith serve --kb). docs/kb.md describes it.

readers.py   files (text, Markdown, HTML, PDF, code) -> blocks
chunking.py  blocks -> token-bounded chunks with heading paths and overlap
store.py     the SQLite file: documents, chunks, FTS5, vectors; safe concurrent writes
ingest.py    `kb add`: incremental ingestion with per-file errors
search.py    BM25, vector and hybrid retrieval (normalised-score fusion)
prompt.py    retrieved chunks -> a system message with numbered sources, fitted to the context
"""

from chatsmith.kb.store import KnowledgeBase, missing_kb_message

__all__ = ["KnowledgeBase", "missing_kb_message"]

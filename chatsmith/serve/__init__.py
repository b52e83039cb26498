"""Serving: the OpenAI-compatible FastAPI app (`app.py`), request schemas, metrics and the web chat page.

Importing this package imports nothing heavy; `chatsmith serve` calls `app.run_server`.
"""

"""chatsmith: build your own ChatGPT-style assistant from an open model, on one machine.

Importing this package is light: torch, transformers and friends load only inside the functions
that need them (STYLE.md, principle 6).
"""

__version__ = "0.1.0"

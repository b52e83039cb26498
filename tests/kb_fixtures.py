"""Fixture documents for the knowledge-base tests, made in code: every supported format (a PDF
written byte by byte), and a fake embedder for tests about the database rather than the model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def make_pdf(pages: list[list[str]]) -> bytes:
    """A valid PDF with one Helvetica text line per string, one list per page."""
    objs: list[str | None] = []

    def add(s: str | None) -> int:
        objs.append(s)
        return len(objs)

    font = add("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    pages_id = add(None)
    kids = []
    for lines in pages:
        text = " ".join(f"({line.replace('(', '[').replace(')', ']')}) '" for line in lines)
        stream = f"BT /F1 12 Tf 72 720 Td 14 TL {text} ET"
        content = add(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        kids.append(add(f"<< /Type /Page /Parent {pages_id} 0 R /MediaBox [0 0 612 792] /Resources << /Font << "
                        f"/F1 {font} 0 R >> >> /Contents {content} 0 R >>"))
    objs[pages_id - 1] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    catalog = add(f"<< /Type /Catalog /Pages {pages_id} 0 R >>")
    out, offsets = b"%PDF-1.4\n", []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{o}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root {catalog} 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def encrypted_pdf(pages: list[list[str]], password: str = "secret") -> bytes:
    import io

    from pypdf import PdfReader, PdfWriter

    w = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(pages))))
    w.encrypt(password, algorithm="RC4-128")
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


MARKDOWN = """# Pump manual

Intro paragraph about the pump.

## Installation

Mount the pump on a level surface. Connect the inlet hose before the outlet hose.

```bash
pumpctl install --mount level
pumpctl check
```

## Troubleshooting

### Error codes

Error E-4012 means the impeller is jammed: switch the pump off and clear the impeller.

### Noise

A rattling sound usually means air in the line; bleed the line through the top valve.
"""

HTML = """<!doctype html><html><head><title>Garden guide</title><style>body {color: red}</style>
<script>var secret = "do not index";</script></head><body>
<nav>Home | About</nav>
<h1>Garden guide</h1><p>Tomatoes need six hours of sun a day.</p>
<h2>Watering</h2><p>Water the roots early in the morning, never the leaves.</p>
<ul><li>Clay soil: once a week</li><li>Sandy soil: twice a week</li></ul>
<pre>water --zone 3 --minutes 20</pre>
</body></html>"""

CODE = '''"""A module docstring."""

import math


class Circle:
    """A circle."""

    def __init__(self, radius):
        self.radius = radius

    def area(self):
        return math.pi * self.radius ** 2


def golden_ratio():
    return (1 + 5 ** 0.5) / 2
'''

TEXT = """WEATHER REPORT

The storm will reach the coast on Tuesday evening.

Winds up to 90 km/h are expected north of the bay.
"""


def write_corpus(folder: Path) -> dict[str, Path]:
    """One file of each supported kind in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"markdown": folder / "pump.md", "html": folder / "garden.html", "code": folder / "shapes.py",
             "text": folder / "weather.txt", "pdf": folder / "torque.pdf"}
    files["markdown"].write_text(MARKDOWN)
    files["html"].write_text(HTML)
    files["code"].write_text(CODE)
    files["text"].write_text(TEXT)
    files["pdf"].write_bytes(make_pdf([["Torque specifications", "The X-200 wrench is limited to 45 Nm of torque."],
                                       ["Calibration", "Calibrate the wrench every 5000 cycles against a reference."]]))
    return files


class FakeEmbedder:
    """Deterministic unit vectors from a hash of the text, words as tokens: for tests of the
    database and the ingester, where what the vectors mean does not matter."""

    max_length = 256
    name = "all-minilm-l6-v2"

    def __init__(self, dim: int = 16) -> None:
        self.dim, self.calls, self.texts = dim, 0, 0

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def encode_array(self, texts: list[str], batch_size: int = 32, progress: str | None = None) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out

"""Files -> blocks: every supported format becomes one list of `Block`s (headings, paragraphs, code,
page breaks) that the chunker (kb/chunking.py) cuts into chunks the same way.

Formats, by file suffix: plain text, Markdown (and reStructuredText's underlined headings), HTML
(the standard library's parser: headings, paragraphs, list items, <pre> blocks; scripts and styles
dropped), PDF (pypdf, page by page) and source code (definitions become headings, so a chunk of a
method carries "class Engine > def step" as its heading path). A file that cannot be read raises
`UnreadableFile` with the reason; the ingester reports it by name and goes on with the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

MARKDOWN = {".md", ".markdown", ".mdx", ".rst"}
TEXT = {".txt", ".text"}
HTML = {".html", ".htm", ".xhtml"}
PDF = {".pdf"}
CODE = {".py", ".pyi", ".js", ".mjs", ".cjs", ".ts", ".tsx", ".jsx", ".java", ".kt", ".scala", ".c", ".h", ".cc",
        ".cpp", ".cxx", ".hpp", ".cs", ".go", ".rs", ".rb", ".php", ".swift", ".m", ".lua", ".r", ".jl", ".pl",
        ".sh", ".bash", ".zsh", ".sql", ".css", ".scss", ".vue", ".svelte", ".yaml", ".yml", ".toml", ".ini",
        ".cfg", ".json", ".proto", ".cu", ".zig", ".dart", ".ex", ".exs", ".hs", ".ml", ".clj"}
SUPPORTED = MARKDOWN | TEXT | HTML | PDF | CODE
MAX_FILE_BYTES = 64 * 2**20   # a larger file is refused: it is a data dump, not a document


class UnreadableFile(Exception):
    """A file that is skipped, with the reason (what was wrong and what to do)."""


@dataclass
class Block:
    """A piece of a document. kind: "heading" (level, text = its title), "text" (a paragraph,
    list or table), "code" (lines kept as they are) or "break" (a page boundary: no chunk spans it).
    `line` is the 1-based line of the source where it starts (0 when unknown); `page` for PDFs."""

    kind: str
    text: str = ""
    level: int = 0
    line: int = 0
    page: int = 0


@dataclass
class Document:
    """A file read into blocks; `kind` is markdown, text, html, pdf or code."""

    path: Path
    kind: str
    blocks: list[Block]
    title: str = ""


def kind_of(path: Path) -> str | None:
    """The reader a file gets by its suffix, or None when unsupported."""
    s = path.suffix.lower()
    for kind, suffixes in (("markdown", MARKDOWN), ("text", TEXT), ("html", HTML), ("pdf", PDF), ("code", CODE)):
        if s in suffixes:
            return kind
    return None


def read_document(path: Path, data: bytes | None = None) -> Document:
    """Read `path` (or its bytes, already read) into blocks, or raise UnreadableFile."""
    kind = kind_of(path)
    if kind is None:
        raise UnreadableFile(f"unsupported file type '{path.suffix or '(none)'}' (supported: text, Markdown, HTML, "
                             "PDF and source code)")
    if data is None:
        data = read_bytes(path)
    if kind == "pdf":
        return _read_pdf(path, data)
    text = _decode(data)
    if kind == "markdown":
        blocks = markdown_blocks(text)
    elif kind == "text":
        blocks = text_blocks(text)
    elif kind == "html":
        parser = _HTMLBlocks()
        parser.feed(text)
        parser.close()
        blocks, title = parser.finish(), parser.title.strip()
        return _checked(Document(path, kind, blocks, title))
    else:
        blocks = code_blocks(text, path.suffix.lower())
    title = next((b.text for b in blocks if b.kind == "heading"), "")
    return _checked(Document(path, kind, blocks, title))


def read_bytes(path: Path) -> bytes:
    """A file's bytes, or UnreadableFile saying why not."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UnreadableFile(f"{size / 2**20:.0f} MB is larger than the {MAX_FILE_BYTES // 2**20} MB a document "
                                 "may have; split it")
        return path.read_bytes()
    except PermissionError:
        raise UnreadableFile("permission denied (make it readable: chmod +r)") from None
    except IsADirectoryError:
        raise UnreadableFile("is a directory") from None
    except OSError as e:
        raise UnreadableFile(f"cannot be read ({e.strerror or e})") from None


def _checked(doc: Document) -> Document:
    if not any(b.kind in ("text", "code") and b.text.strip() for b in doc.blocks):
        raise UnreadableFile("has no text to index (empty?)")
    return doc


def _decode(data: bytes) -> str:
    if b"\x00" in data[:8192] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UnreadableFile("is binary, not text (it holds NUL bytes)")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise UnreadableFile("starts with a UTF-16 mark but is not UTF-16 text") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UnreadableFile(f"is not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}); re-save it as UTF-8") from None


# ---- Markdown and plain text ----------------------------------------------------------------------

_ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_SETEXT = re.compile(r"^ {0,3}(=+|-+|~+|\^+)\s*$")
_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s+")


def markdown_blocks(text: str) -> list[Block]:
    """Markdown (and reStructuredText) -> blocks: ATX and underlined headings, fenced code kept
    whole, paragraphs split at blank lines (a list item starts a new paragraph)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    para: list[str] = []
    para_line = 0

    def flush() -> None:
        nonlocal para
        if para:
            blocks.append(Block("text", "\n".join(para).strip(), line=para_line))
            para = []

    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            flush()
            mark, start = fence.group(1), i
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(mark[0] * len(mark)):
                body.append(lines[i])
                i += 1
            if any(x.strip() for x in body):
                blocks.append(Block("code", "\n".join(body), line=start + 2))
            i += 1
            continue
        atx = _ATX.match(line)
        if atx:
            flush()
            blocks.append(Block("heading", atx.group(2).strip(), level=len(atx.group(1)), line=i + 1))
            i += 1
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if (line.strip() and not para and _SETEXT.match(nxt) and len(nxt.strip()) >= min(3, len(line.strip()))
                and not _ITEM.match(line)):
            flush()
            level = {"=": 1, "-": 2, "~": 3, "^": 4}[nxt.strip()[0]]
            blocks.append(Block("heading", line.strip(), level=level, line=i + 1))
            i += 2
            continue
        if not line.strip():
            flush()
        elif line.startswith(("    ", "\t")) and not para:
            # An indented code block (Markdown) or a literal block (reStructuredText).
            start, body = i, []
            while i < len(lines) and (lines[i].startswith(("    ", "\t")) or not lines[i].strip()):
                body.append(lines[i])
                i += 1
            blocks.append(Block("code", "\n".join(body).rstrip(), line=start + 1))
            continue
        else:
            if _ITEM.match(line) and para and not _ITEM.match(para[0]):
                flush()
            if not para:
                para_line = i + 1
            para.append(line.rstrip())
        i += 1
    flush()
    return blocks


def text_blocks(text: str) -> list[Block]:
    """Plain text -> paragraphs at blank lines; a short line in capitals standing alone
    ("CHAPTER IV", "ARTICLE II") is taken as a heading."""
    blocks: list[Block] = []
    for block in markdown_paragraphs(text):
        first = block.text.splitlines()[0]
        if ("\n" not in block.text and len(first) <= 80 and any(c.isalpha() for c in first)
                and first == first.upper()):
            blocks.append(Block("heading", first.strip(), level=1, line=block.line))
        else:
            blocks.append(block)
    return blocks


def markdown_paragraphs(text: str) -> list[Block]:
    """Paragraphs of plain text (no Markdown syntax): blocks separated by blank lines."""
    out, para, start = [], [], 0
    for i, line in enumerate(text.splitlines() + [""]):
        if line.strip():
            if not para:
                start = i + 1
            para.append(line.rstrip())
        elif para:
            out.append(Block("text", "\n".join(para).strip(), line=start))
            para = []
    return out


# ---- HTML -----------------------------------------------------------------------------------------


class _HTMLBlocks(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "svg", "head", "nav", "footer"}
    BREAK = {"p", "div", "li", "tr", "br", "section", "article", "blockquote", "dd", "dt", "table", "ul", "ol",
             "header", "main", "aside", "figure", "figcaption", "hr", "form", "details", "summary"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.buf: list[str] = []
        self.skip = 0
        self.heading: int | None = None
        self.pre = 0
        self.title = ""
        self.in_title = False
        self.item = False

    def _flush(self) -> None:
        text = "".join(self.buf)
        self.buf = []
        if self.pre:
            return
        text = re.sub(r"[ \t\r\f\v]+", " ", text)
        text = "\n".join(x.strip() for x in text.split("\n") if x.strip())
        if text:
            self.blocks.append(Block("text", text))

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "title":
            self.in_title = True
        if tag in self.SKIP:
            self.skip += 1
            return
        if self.skip:
            return
        if re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self.heading = int(tag[1])
        elif tag == "pre":
            self._flush()
            self.pre += 1
        elif tag in self.BREAK and not self.pre:
            if tag == "li" or tag in ("p", "div", "table", "ul", "ol", "section", "article", "blockquote"):
                self._flush()
            else:
                self.buf.append("\n")
            if tag == "li":
                self.buf.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
            return
        if self.skip:
            return
        if self.heading is not None and re.fullmatch(r"h[1-6]", tag):
            title = re.sub(r"\s+", " ", "".join(self.buf)).strip()
            self.buf = []
            if title:
                self.blocks.append(Block("heading", title, level=self.heading))
            self.heading = None
        elif tag == "pre" and self.pre:
            self.pre -= 1
            code = "".join(self.buf).strip("\n")
            self.buf = []
            if code.strip():
                self.blocks.append(Block("code", code))
        elif tag in self.BREAK and not self.pre:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title += data
        if not self.skip:
            self.buf.append(data)

    def finish(self) -> list[Block]:
        self._flush()
        return self.blocks


# ---- PDF ------------------------------------------------------------------------------------------


def _read_pdf(path: Path, data: bytes) -> Document:
    """Pages of text through pypdf; a page boundary is a block boundary (a chunk stays on its page)."""
    try:
        import io

        from pypdf import PdfReader
        from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError
    except ImportError:
        raise UnreadableFile("reading PDF needs pypdf: pip install pypdf") from None
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")   # many PDFs are "encrypted" with an empty password (permissions only)
            except (DependencyError, NotImplementedError):
                opened = 0
            if not opened:
                raise UnreadableFile("is encrypted (password-protected); decrypt it first, e.g. `qpdf --decrypt "
                                     "--password=PW in.pdf out.pdf`")
        blocks: list[Block] = []
        for number, page in enumerate(reader.pages, start=1):
            text = page.extract_text() or ""
            if blocks:
                blocks.append(Block("break", page=number))
            for b in _pdf_paragraphs(text):
                b.page = number
                blocks.append(b)
        title = ""
        if reader.metadata is not None and reader.metadata.title:
            title = str(reader.metadata.title)
    except UnreadableFile:
        raise
    except FileNotDecryptedError:
        raise UnreadableFile("is encrypted (password-protected); decrypt it first") from None
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise UnreadableFile(f"is not a readable PDF ({type(e).__name__}: {str(e)[:120]})") from None
    if not any(b.kind == "text" for b in blocks):
        raise UnreadableFile("has no extractable text (a scanned PDF? run OCR on it first, e.g. ocrmypdf)")
    return Document(path, "pdf", blocks, title)


def _pdf_paragraphs(text: str) -> list[Block]:
    """A page's text in paragraphs: blank lines, or a line ending a sentence followed by a short
    line, end one; lines of a paragraph are joined (pypdf breaks lines where the page did)."""
    out: list[Block] = []
    for block in markdown_paragraphs(text):
        out.append(Block("text", re.sub(r"(?<!\n)\n(?!\n)", " ", block.text)))
    return out


# ---- source code ----------------------------------------------------------------------------------

_DEF = re.compile(r"^(?P<indent>[ \t]*)(?P<sig>(?:@\w[\w.]*\s*)?(?:(?:export|default|public|private|protected|static|"
                  r"async|abstract|final|override|pub(?:\(crate\))?|unsafe|inline|virtual|extern)\s+)*"
                  r"(?:def|class|function|func|fn|impl|struct|enum|trait|interface|module|type|object|"
                  r"record|namespace|macro_rules!)\s+[\w$<>:,.\[\]\- ]+)")


def code_blocks(text: str, suffix: str) -> list[Block]:
    """Source code -> a heading per definition (def, class, function, fn, struct...: nested ones
    by indentation) and the code under it as one block (the chunker splits it at blank lines)."""
    if suffix in (".json", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".css", ".scss", ".sql"):
        headings = False   # data and style files: no definitions to find
    else:
        headings = True
    lines = text.splitlines()
    blocks: list[Block] = []
    body: list[str] = []
    start = 1

    def flush() -> None:
        nonlocal body
        if any(x.strip() for x in body):
            # drop leading blank lines but keep line numbers right
            lead = next(i for i, x in enumerate(body) if x.strip())
            blocks.append(Block("code", "\n".join(body[lead:]).rstrip(), line=start + lead))
        body = []

    for i, line in enumerate(lines):
        m = _DEF.match(line) if headings else None
        if m and len(m.group("indent").expandtabs(4)) <= 8:
            flush()
            level = len(m.group("indent").expandtabs(4)) // 4 + 1
            sig = re.sub(r"\s+", " ", m.group("sig")).strip().rstrip("{:(").strip()
            blocks.append(Block("heading", sig[:80], level=level, line=i + 1))
            start = i + 1
            body = [line]
            continue
        if not body:
            start = i + 1
        body.append(line)
    flush()
    return blocks

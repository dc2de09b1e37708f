"""Knowledge-base retrieval: documents split into chunks, ranked with Okapi BM25.

Small and dependency-free on purpose; each answer cites the chunks it used as `evidence`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from shared.models import Evidence, KnowledgeBase

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "could",
        "do",
        "does",
        "for",
        "from",
        "get",
        "got",
        "have",
        "how",
        "i",
        "if",
        "in",
        "is",
        "it",
        "its",
        "me",
        "my",
        "of",
        "on",
        "or",
        "our",
        "please",
        "s",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "us",
        "was",
        "we",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "t",
    ]
)
K1, B = 1.5, 0.75


def _stem(word: str) -> str:
    """A light suffix strip so 'refunds'/'refunded'/'refund' and 'shipping'/'shipped' meet."""
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    if len(word) > 3 and word[-1] == word[-2]:  # shipp -> ship
        word = word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP]


@dataclass(frozen=True)
class Chunk:
    id: str
    text: str
    terms: Counter[str]


def chunk_document(doc_id: str, text: str, max_words: int = 80) -> list[tuple[str, str]]:
    """Sentences grouped into chunks of at most `max_words` words."""
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    chunks: list[str] = []
    current: list[str] = []
    for sentence in sentences:
        if current and len(" ".join([*current, sentence]).split()) > max_words:
            chunks.append(" ".join(current))
            current = []
        current.append(sentence)
    if current:
        chunks.append(" ".join(current))
    return [(f"{doc_id}#{i}", chunk) for i, chunk in enumerate(chunks)]


class KnowledgeIndex:
    def __init__(self, kb: KnowledgeBase) -> None:
        self.kb_id = kb.id
        # A document's title is indexed with each of its chunks: "Support hours" is how people
        # ask for a text that never says "hours".
        self.chunks = [
            Chunk(id=cid, text=text, terms=Counter(tokenize(f"{doc.title} {text}")))
            for doc in kb.documents
            for cid, text in chunk_document(doc.id, doc.text)
        ]
        n = len(self.chunks)
        self.avg_len = sum(sum(c.terms.values()) for c in self.chunks) / n if n else 0.0
        df: Counter[str] = Counter()
        for chunk in self.chunks:
            df.update(chunk.terms.keys())
        # BM25+ style idf, floored at a small positive value so common terms never subtract.
        self.idf = {t: max(math.log((n - f + 0.5) / (f + 0.5) + 1.0), 0.01) for t, f in df.items()}

    def search(self, query: str, limit: int = 3) -> list[Evidence]:
        terms = tokenize(query)
        scored: list[tuple[float, Chunk]] = []
        for chunk in self.chunks:
            length = sum(chunk.terms.values())
            score = 0.0
            for term in terms:
                tf = chunk.terms.get(term, 0)
                if tf:
                    norm = tf + K1 * (1 - B + B * length / (self.avg_len or 1))
                    score += self.idf[term] * tf * (K1 + 1) / norm
            if score > 0:
                scored.append((score, chunk))
        scored.sort(key=lambda pair: pair[0], reverse=True)
        return [
            Evidence(chunk_id=c.id, kb_id=self.kb_id, score=round(s, 4), text=c.text)
            for s, c in scored[:limit]
        ]

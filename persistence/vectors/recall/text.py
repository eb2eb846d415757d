"""The full-text (BM25) leg of recall, in memory: a tantivy index beside a ``Snapshot``.

Contract: ``TextIndex.search`` answers what LanceDB's full-text query
(``table.query().nearest_to_text(text).where(scope)``) answers on the same
table version: the same matches and the same ``_score`` (measured on LoCoMo:
every score within 3e-7 relative; see docs/benchmarks.md). That holds because:

- ``ANALYZER`` is the analyzer of the index we create (``FTS(with_position=False)``,
  lancedb 0.40 defaults), filter for filter and in Lance's order: split on
  what is not a letter or digit, drop tokens of 40 bytes or more, lowercase,
  English stemming, then the stop words (so they are matched against stems:
  "was" and "being" go, "because" stems to "becaus" and stays), then ASCII
  folding. Lance's stop words are not tantivy's English list (33 words) but
  the ``STOP_WORDS`` below, found by querying LanceDB word by word
  (tests/test_recall_text.py checks the whole analyzer against LanceDB).
- tantivy and Lance score with the same BM25 (k1 1.2, b 0.75, statistics over
  every row of the index, whatever the filter), and a query is the sum over
  its analyzed tokens, a repeated token counted again.
- Every row of the snapshot with a token is a document, superseded ones too
  (they are in LanceDB's index), so the statistics are the table's. Lance
  leaves rows without a token (empty, only stop words) out of the row count
  and the mean length: so does ``add``.

Scope is a term filter: each document carries the key of its snapshot
partition (``term_of``), and a search admits only the keys it is given
(``Snapshot.keys``): a person's fact never matches for anyone else.
Superseded rows carry ``DEAD``, which no partition has.

Drift: a removed row (deleted or superseded) stops matching at once, but it
keeps counting in the statistics until tantivy merges its segment; LanceDB
keeps a deleted row in them until its next ``optimize`` and a superseded one
for good. The difference is in the third or fourth digit of a score, until
the snapshot is built again.

Writes: changes go to the index writer at once (cheap) and become visible
with ``commit`` (a new segment: ~4-5 ms of CPU, mostly tantivy's own
threads), which the recall cache runs in a worker thread before it
publishes the snapshot's new version. Only the holder of the cache's lock
for the bot changes an index; searches may run in any thread.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import tantivy

# LanceDB's English stop words (empirical, see the module docstring): matched after stemming.
STOP_WORDS = """i me my myself we our ours ourselves you your yours yourself yourselves he him
his himself she her hers herself it its itself they them their theirs themselves what which who
whom this that these those am is are was were be been being have has had having do does did
doing a an the and but if or because as until while of at by for with about against between into
through during before after above below to from up down in out on off over under again further
then once here there when where why how all any both each few more most other some such no nor
not only own same so than too very s t can will just don should now d ll m o re ve y ain aren
couldn didn doesn hadn hasn haven isn ma mightn mustn needn shan shouldn wasn weren won
wouldn""".split()
MAX_TOKEN = 40  # Lance's max_token_length: tokens of this many bytes or more are dropped
DEAD = "-"  # the key of a superseded row: no partition's term (those are JSON arrays)
HEAP = 15_000_000  # the writer's arena; tantivy's minimum per thread


def _analyzer() -> tantivy.TextAnalyzer:
    return (tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
            .filter(tantivy.Filter.remove_long(MAX_TOKEN))
            .filter(tantivy.Filter.lowercase())
            .filter(tantivy.Filter.stemmer("english"))
            .filter(tantivy.Filter.custom_stopword(STOP_WORDS))
            .filter(tantivy.Filter.ascii_fold())
            .build())


ANALYZER = _analyzer()


def tokens(text: str) -> list[str]:
    """``text`` as LanceDB's full-text index sees it (repeats kept: each one scores)."""
    return ANALYZER.analyze(text)


def term_of(user: str, chat: str) -> str:
    """The filter term of a partition (JSON: no two (user, chat) pairs alike)."""
    return json.dumps([user, chat], ensure_ascii=False)


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("text", tokenizer_name="lance", index_option="freq")
    builder.add_text_field("key", tokenizer_name="raw", index_option="basic")
    builder.add_text_field("user", tokenizer_name="raw", index_option="basic")
    builder.add_integer_field("row", indexed=True, fast=True)  # the snapshot's row number
    return builder.build()


SCHEMA = _schema()


class TextIndex:
    """The text of a snapshot's rows, by row number; see the module docstring."""

    def __init__(self) -> None:
        self._index = tantivy.Index(SCHEMA)
        self._index.register_tokenizer("lance", ANALYZER)
        self._writer: tantivy.IndexWriter | None = None
        self.dirty = False  # changes not yet committed

    def _write(self) -> tantivy.IndexWriter:
        if self._writer is None:  # one thread: a few rows at a time, or a load in the background
            self._writer = self._index.writer(HEAP, 1)
        return self._writer

    def add(self, rows: Sequence[int], texts: Sequence[str], users: Sequence[str],
            keys: Sequence[str]) -> None:
        """Index rows (``keys``: ``term_of`` their partition, or ``DEAD``)."""
        writer = self._write()
        for row, text, user, key in zip(rows, texts, users, keys, strict=True):
            if not ANALYZER.analyze(text):
                continue  # no token (empty, only stop words): Lance counts no such row
            doc = tantivy.Document()
            doc.add_text("text", text)
            doc.add_text("key", key)
            doc.add_text("user", user)
            doc.add_integer("row", row)
            writer.add_document(doc)
        self.dirty = self.dirty or bool(rows)

    def remove(self, rows: Sequence[int]) -> None:
        """These rows match no search from the next commit on."""
        writer = self._write()
        for row in rows:
            writer.delete_documents_by_term("row", row)
        self.dirty = self.dirty or bool(rows)

    def remove_user(self, user: str) -> None:
        self._write().delete_documents_by_term("user", user)
        self.dirty = True

    def commit(self) -> None:
        """Make every change visible to searches (CPU: call it in a worker thread).

        The writer goes too (its arena and threads; the next change opens
        another): writes are rare next to searches, and a process holds many bots.
        """
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        if self.dirty:
            writer.commit()
        writer.wait_merging_threads()
        self._index.reload()
        self.dirty = False

    def search(self, terms: Sequence[str], keys: Sequence[tuple[str, str]], limit: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """(row numbers, BM25 scores) of the best ``limit`` committed rows of the
        partitions ``keys`` for the analyzed ``terms`` (``tokens``), best first."""
        if not terms or not keys or limit <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        words = tantivy.Query.boolean_query([
            (tantivy.Occur.Should, tantivy.Query.term_query(SCHEMA, "text", t, "freq"))
            for t in terms])
        # Terms one by one, not a term-set query: that one costs ~0.25 ms at any size.
        scope = tantivy.Query.boolean_query([
            (tantivy.Occur.Should, tantivy.Query.term_query(SCHEMA, "key", term_of(*k), "basic"))
            for k in keys])
        query = tantivy.Query.boolean_query([  # the scope adds 0 to a score: filter only
            (tantivy.Occur.Must, words),
            (tantivy.Occur.Must, tantivy.Query.const_score_query(scope, 0.0))])
        searcher = self._index.searcher()
        hits = searcher.search(query, limit, count=False).hits
        rows = searcher.fast_field_values("row", [address for _, address in hits])
        return (np.asarray(rows, np.int64),
                np.asarray([score for score, _ in hits], np.float32))

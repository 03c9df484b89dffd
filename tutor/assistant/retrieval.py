"""Find the lesson passages that answer a learner's question: the :class:`Retriever`, which
keeps the index of the lessons searched so far and answers searches over it.

Every lesson is cut into chunks (:mod:`tutor.assistant.chunks`), one per paragraph of a
section, each with a stable anchor, and each chunk is embedded (:mod:`tutor.assistant.embedder`).
A search ranks the chunks of the current :class:`~tutor.assistant.search_index.IndexView` by
embedding similarity and BM25 and decides whether the lessons cover the question
(:mod:`tutor.assistant.ranking`); it returns a :class:`~tutor.assistant.hits.SearchResult`.

The chunk embeddings are cached on disk per lesson (``tutor.assistant.lesson_vectors``), keyed by the
lesson's text and the embedding model, so an edited lesson is embedded again alone. A big
library is indexed lazily: the lesson a question is about and its related ones first, the rest
in the background (:meth:`Retriever.index_rest`); BM25 and the vocabulary of the off-topic
check always cover exactly the lessons searched. torch and sentence-transformers are imported
only when a text is embedded.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tutor.assistant.chunks import Chunk, lesson_and_related, lesson_chunks
from tutor.assistant.elsewhere import ELSEWHERE
from tutor.assistant.embedder import BATCH_SIZE, EMBED_DIM, MemoEmbedder, model_id
from tutor.assistant.hits import Hit, SearchResult
from tutor.assistant.lesson_vectors import lesson_key, read_vectors, write_vectors
from tutor.assistant.ranking import rank
from tutor.assistant.search_index import IndexedLesson, IndexView
from tutor.assistant.text_vectors import TextVectors, store_path
from tutor.library.content import Library, load_lesson
from tutor.library.models import ContentFileError
from tutor.text import clean

# The fields elsewhere's vectors are cached as if a lesson of this id (lesson ids have no "_").
FIELDS_FILE = "_elsewhere"

# The background pass rebuilds the searched view (BM25 over every indexed passage) once the
# work since the last rebuild took this many times as long as that rebuild did.
PUBLISH_AFTER = 4

Progress = Callable[[str, float], None]

# --- the retriever ------------------------------------------------------------------


@dataclass
class Retriever:
    """The index of the lessons indexed so far, with the embedder that fills it; :meth:`search`
    answers queries. Lessons join the index as they are needed: those named at :meth:`load`, the
    one a question is about and its related ones (:meth:`include`), the rest by :meth:`index_rest`."""

    library: Library
    index_dir: Path
    model_name: str
    embedder: MemoEmbedder = field(default_factory=MemoEmbedder)
    embedded_lessons: list[str] = field(default_factory=list)  # lessons embedded here, not read from disk
    _indexed: dict[str, IndexedLesson] = field(default_factory=dict, repr=False)
    _unindexable: set[str] = field(default_factory=set, repr=False)  # broken or empty lessons
    _view: IndexView = field(default_factory=lambda: IndexView.of([]), repr=False)
    _state: threading.Lock = field(default_factory=threading.Lock, repr=False)  # _indexed
    _publish: threading.Lock = field(default_factory=threading.Lock, repr=False)  # _view
    _fields: np.ndarray | None = field(default=None, repr=False)  # ELSEWHERE's vectors, once embedded

    @classmethod
    def load(
        cls,
        library: Library,
        progress: Progress | None = None,
        cache_dir: Path | None = None,
        model_path: Path | None = None,
        lessons: Sequence[str] | None = None,
    ) -> Retriever:
        """The retriever with ``lessons`` indexed (every lesson by default), each read from the
        cache when its text is unchanged and embedded otherwise."""
        if cache_dir is None:
            from tutor.paths import cache_dir as default_cache_dir

            cache_dir = default_cache_dir()
        # With every lesson cached the model is needed only for questions: it loads on the first
        # one or on warm() (the engine calls it right after it says ready), which takes
        # sentence-transformers' imports (about 2 s here) off the learner's wait.
        index_dir, name = cache_dir / "index", model_id()
        store = TextVectors(store_path(index_dir, name), EMBED_DIM)
        retriever = cls(library, index_dir, name, MemoEmbedder(model_path, store))
        retriever.include(list(library.lessons) if lessons is None else lessons, progress)
        if not retriever._indexed and not retriever.pending():
            raise ValueError("no lesson text to index")
        return retriever

    @property
    def embedded(self) -> int:
        """Texts run through the model by this retriever (passages plus queries)."""
        return self.embedder.embedded

    @property
    def chunks(self) -> list[Chunk]:
        return self._view.chunks

    @property
    def vectors(self) -> np.ndarray:
        return self._view.vectors

    @property
    def searched(self) -> frozenset[str]:
        """The lessons a search reads now."""
        return self._view.lessons

    def pending(self) -> list[str]:
        """The lessons not indexed yet, in catalogue order."""
        return [i for i in self.library.lessons if i not in self._indexed and i not in self._unindexable]

    def coverage(self) -> dict[str, Any]:
        """How far indexing is, for the engine's status: lessons searched of those that can be."""
        total = len(self.library.lessons) - len(self._unindexable)
        return {"lessons": len(self._view.lessons), "total": total, "done": not self.pending()}

    def include(self, lesson_ids: Sequence[str], progress: Progress | None = None) -> None:
        """Index these lessons now, if they are not yet, and search them from now on."""
        if all(i in self._indexed or i in self._unindexable for i in lesson_ids):
            return
        self._index(lesson_ids, progress or (lambda _message, _fraction: None))
        self._publish_view()

    def index_rest(
        self,
        pause: Callable[[], object] = lambda: None,
        run: Callable[[Callable[[], None]], object] = lambda step: step(),
    ) -> None:
        """Index every lesson not indexed yet, one at a time (the engine runs this in the
        background). ``pause`` is called between lessons: it blocks while something more urgent
        (a learner's question) needs the CPU. ``run`` runs each lesson's step (the engine gives
        each a thread of its own, which must not outlive it: ``pause`` is called between them).

        Searches see the new lessons in steps: the view is rebuilt once the work since the last
        rebuild took PUBLISH_AFTER times as long as that rebuild, so rebuilding BM25 over a
        growing library stays a small share of the pass.
        """
        last_build_s, since = 0.0, time.perf_counter()
        for lesson_id in self.pending():
            pause()
            run(partial(self._index, [lesson_id], lambda _message, _fraction: None))
            if time.perf_counter() - since >= PUBLISH_AFTER * last_build_s:
                started = time.perf_counter()
                self._publish_view()
                since = time.perf_counter()
                last_build_s = since - started
        self._publish_view()

    def _index(self, lesson_ids: Sequence[str], report: Progress) -> None:
        """Read these lessons' vectors from the cache; embed (and cache) the rest in one pass."""
        missing: list[tuple[str, list[Chunk]]] = []
        for lesson_id in lesson_ids:
            if lesson_id in self._indexed or lesson_id in self._unindexable:
                continue
            key = self._key(lesson_id)
            cached = None if key is None else read_vectors(self.index_dir, lesson_id, key)
            chunks = _chunks_of(cached[0]) if cached is not None else None
            if cached is not None and chunks:
                self._add(IndexedLesson.of(chunks, cached[1]))
                continue
            chunks = self._parse(lesson_id) if key is not None else []
            if chunks:
                missing.append((lesson_id, chunks))
            else:
                self._unindexable.add(lesson_id)
        if not missing:
            if lesson_ids:
                report("Index loaded from cache", 1.0)
            return
        report("Loading the embedding model", 0.0)
        self.embedder.warm()
        texts = [c.embed_text() for _lesson_id, chunks in missing for c in chunks]
        # Batches of similar length waste less work on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors = np.zeros((len(texts), 0), np.float32)
        for start in range(0, len(texts), BATCH_SIZE):
            report(f"Indexing the lessons: {start}/{len(texts)} passages", start / len(texts))
            batch = order[start : start + BATCH_SIZE]
            embedded = self.embed([texts[i] for i in batch], remember=False)
            if not vectors.shape[1]:
                vectors = np.zeros((len(texts), embedded.shape[1]), np.float32)
            vectors[batch] = embedded
        start = 0
        for lesson_id, chunks in missing:
            mine = vectors[start : start + len(chunks)]
            start += len(chunks)
            key = self._key(lesson_id)
            if key is not None:
                write_vectors(self.index_dir, lesson_id, key, [asdict(c) for c in chunks], mine)
            self._add(IndexedLesson.of(chunks, mine))
            self.embedded_lessons.append(lesson_id)
        report(f"Indexed {len(texts)} passages", 1.0)

    def _key(self, lesson_id: str) -> str | None:
        """The cache key of the lesson's text as it is on disk now (None: it can't be read)."""
        assert self.library.root is not None, "a library with lessons was read from a folder"
        try:
            return lesson_key((self.library.root / lesson_id / "lesson.md").read_bytes(), self.model_name)
        except OSError:
            return None

    def _parse(self, lesson_id: str) -> list[Chunk]:
        """The lesson's passages, parsed from its folder; none for a broken lesson. Not through
        Library.get: that keeps every lesson it opens, and this reads them all."""
        assert self.library.root is not None
        try:
            return lesson_chunks(load_lesson(self.library.root / lesson_id))
        except ContentFileError:
            return []

    def _add(self, lesson: IndexedLesson) -> None:
        with self._state:
            self._indexed.setdefault(lesson.lesson_id, lesson)

    def _publish_view(self) -> None:
        with self._publish:  # two threads adding lessons must not publish an older view last
            with self._state:
                indexed = list(self._indexed.values())
            if len(indexed) == len(self._view.lessons):
                return
            position = {lesson_id: n for n, lesson_id in enumerate(self.library.lessons)}
            indexed.sort(key=lambda lesson: position[lesson.lesson_id])
            self._view = IndexView.of(indexed)

    def warm(self) -> None:
        """Load the embedding model now, if it is not loaded yet, and the fields elsewhere's
        vectors (from the cache, or embedded once and cached): the first question waits for
        neither."""
        self.embedder.warm()
        self._field_vectors()

    def _field_vectors(self) -> np.ndarray:
        """ELSEWHERE's vectors (``tutor.assistant.elsewhere``), cached beside the lessons' under
        a key of their text and the model: embedding them took 0.57 s on a first question."""
        if self._fields is None:
            key = lesson_key("\n".join(ELSEWHERE).encode("utf-8"), self.model_name)
            cached = read_vectors(self.index_dir, FIELDS_FILE, key)
            if cached is not None and len(cached[1]) == len(ELSEWHERE):
                self._fields = cached[1]
            else:
                self._fields = self.embed(ELSEWHERE, remember=False)
                write_vectors(
                    self.index_dir, FIELDS_FILE, key, [{"text": t} for t in ELSEWHERE], self._fields
                )
        return self._fields

    def embed(self, texts: Sequence[str], remember: bool = True) -> np.ndarray:
        """Unit-length float32 embeddings, one row per text (see :meth:`MemoEmbedder.embed`)."""
        width = self.vectors.shape[1] if self.vectors.ndim == 2 and self.vectors.shape[1] else EMBED_DIM
        return self.embedder.embed(texts, remember, width)

    def search(self, query: str, k: int = 3, lesson_id: str | None = None) -> SearchResult:
        """The top k sections for ``query`` among the lessons indexed so far; the lesson the
        learner is reading and its related ones are indexed first if they are not yet."""
        started = time.perf_counter()
        query = clean(query).strip()
        if lesson_id is not None and lesson_id in self.library.lessons:
            self.include(lesson_and_related(self.library, lesson_id))
        view = self._view  # one view throughout: the background pass may publish another
        if not query or not view.chunks:
            return SearchResult(query, [], False, [], 0.0, 0.0, 0.0, lesson_id)
        query_vector = self.embed([query])[0]
        result = rank(view, query, query_vector, k, lesson_id, self._field_vectors())
        return dataclasses.replace(result, elapsed_ms=(time.perf_counter() - started) * 1000)

    def section_hits(self, lesson_id: str, section: str) -> list[Hit]:
        """Every chunk of one section as hits (score 0): the passage for a quiz review or a claim."""
        wanted = section.casefold()
        indexed = self._indexed.get(lesson_id)
        if indexed is not None:
            chunks = indexed.chunks
        else:
            try:
                chunks = lesson_chunks(self.library.get(lesson_id))
            except ContentFileError:
                chunks = []
        found = [c for c in chunks if c.section.casefold() == wanted]
        if not found:
            raise KeyError(f"no section {section!r} in lesson {lesson_id!r}")
        return [
            Hit(c.lesson_id, c.lesson_title, c.section, c.anchor, clean(c.text), 0.0, 0.0, 0, None)
            for c in found
        ]


def _chunks_of(passages: list[dict[str, Any]]) -> list[Chunk] | None:
    """Chunks from a cache file's passages; None when they don't fit (a damaged or foreign file)."""
    try:
        return [Chunk(**passage) for passage in passages]
    except TypeError:
        return None

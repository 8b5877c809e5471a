"""The Cell Ontology and reachability matrices over a label set (DESIGN §6).

The ontology ships with the ``cellxgene-ontology-guide`` package (no network). Its ancestor
lists follow **is_a and part_of** (``relations="is_a+part_of"``, the default here because it
is what the shipped data holds). scTab used the **is_a** closure only; that needs the
relation types, which the shipped data does not keep, so it is available from an OBO file
of the Cell Ontology (:meth:`CellOntology.from_obo`, ``relations="is_a"``). Everything is
keyed by CL id, never by label string, and :attr:`CellOntology.version` is recorded in
every output.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from scatlas._errors import InputError


class CellOntology:
    """Ancestor look-ups of Cell Ontology terms.

    Parameters
    ----------
    schema_version
        CELLxGENE schema version whose CL release to load (default: the package's latest).
    """

    def __init__(self, schema_version: str | None = None) -> None:
        from cellxgene_ontology_guide.ontology_parser import OntologyParser
        from cellxgene_ontology_guide.supported_versions import CXGSchema

        schema = CXGSchema(version=schema_version)
        self._parser = OntologyParser(schema_version=schema.version)
        self.version = f"CL {schema.supported_ontologies['CL']['version']} (cellxgene-ontology-guide schema {schema.version})"
        self.relations = "is_a+part_of"
        self._ancestors: dict[str, frozenset[str]] | None = None
        self._labels: dict[str, str] | None = None

    @classmethod
    def from_obo(cls, path: str | Path) -> CellOntology:
        """An is_a-only ontology read from a Cell Ontology ``.obo`` file (``is_a:`` lines only)."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: ontology file not found")
        parents: dict[str, set[str]] = {}
        labels: dict[str, str] = {}
        version, current, obsolete = "unknown", None, set()
        for line in path.read_text().splitlines():
            if line.startswith("data-version:"):
                version = line.split(":", 1)[1].strip()
            elif line == "[Term]":
                current = None
            elif line.startswith("id: CL:"):
                current = line[4:].strip()
                parents.setdefault(current, set())
            elif current and line.startswith("name:"):
                labels[current] = line[5:].strip()
            elif current and line.startswith("is_a: CL:"):
                parents[current].add(line[6:].split("!")[0].strip())
            elif current and line.strip() == "is_obsolete: true":
                obsolete.add(current)
        self = cls.__new__(cls)
        self._parser = None
        self.version = f"CL {version} (is_a from {path.name})"
        self.relations = "is_a"
        self._labels = labels
        self._ancestors = {term: frozenset(_closure(term, parents)) for term in parents if term not in obsolete}
        return self

    def is_valid(self, term: str) -> bool:
        """Whether ``term`` is a current (valid, not deprecated) CL id."""
        if self._parser is None:
            return term in self._ancestors  # type: ignore[operator]
        return term.startswith("CL:") and self._parser.is_valid_term_id(term) and not self._parser.is_term_deprecated(term)

    def ancestors(self, term: str) -> frozenset[str]:
        """Strict ancestors of ``term``."""
        if self._ancestors is not None:
            return self._ancestors[term]
        return frozenset(self._parser.get_term_ancestors(term))

    def label(self, term: str) -> str:
        """Human-readable name of ``term``."""
        if self._labels is not None:
            return self._labels.get(term, term)
        return self._parser.get_term_label(term)

    @cached_property
    def label_to_id(self) -> dict[str, str]:
        """Label (and synonyms, for the package ontology) → CL id."""
        if self._labels is not None:
            return {v: k for k, v in self._labels.items()}
        return {label: term for label, term in self._parser.get_term_label_to_id_map("CL").items()}

    def check_terms(self, terms: Iterable[str], where: str = "") -> None:
        """Raise :class:`InputError` listing every unknown or deprecated id (with replacements when known)."""
        bad = []
        for term in sorted(set(map(str, terms))):  # NumPy strings would print as np.str_('...')
            if self.is_valid(term):
                continue
            hint = ""
            if self._parser is not None and term.startswith("CL:") and self._parser.is_valid_term_id(term):
                replacement = self._parser.get_term_replacement(term)
                hint = f" (deprecated; replaced by {replacement})" if replacement else " (deprecated)"
            bad.append(f"{term!r}{hint}")
        if bad:
            raise InputError(f"{where}unknown or deprecated Cell Ontology ids: {', '.join(bad)} ({self.version})")


def _closure(term: str, parents: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(parents.get(term, ()))
    while stack:
        parent = stack.pop()
        if parent not in seen:
            seen.add(parent)
            stack.extend(parents.get(parent, ()))
    return seen


def reachability(labels: Sequence[str], ontology: CellOntology) -> np.ndarray:
    """``R[i, j] = 1`` when label ``j`` is label ``i`` or one of its descendants.

    Parameters
    ----------
    labels
        CL ids of the classes (the class order of every model output).
    ontology
        The ontology whose ancestor relation is used.

    Returns
    -------
    ``(n_labels, n_labels)`` float32 matrix with ones on the diagonal.
    """
    ontology.check_terms(labels)
    index = {term: i for i, term in enumerate(labels)}
    R = np.eye(len(labels), dtype=np.float32)
    for j, term in enumerate(labels):
        for ancestor in ontology.ancestors(term):
            if ancestor in index:
                R[index[ancestor], j] = 1.0
    return R


def call_terms(labels: Sequence[str], ontology: CellOntology) -> tuple[list[str], np.ndarray, np.ndarray]:
    """What a hierarchical call may return: the labels, then every Cell Ontology term that is an ancestor of two or more of them.

    A cell whose probability is split between labelled subtypes can then be called by their
    common ancestor (e.g. "CD8-positive, alpha-beta T cell" for a cell between naive and
    cytotoxic CD8 T cells), whether or not any source used that term as a label.

    Parameters
    ----------
    labels
        CL ids of the classes (model output order).
    ontology
        The ontology whose ancestor relation is used.

    Returns
    -------
    terms
        CL ids: ``labels`` first, in their order, then the shared ancestors (sorted).
    reach
        ``(T, C)`` float32: ``reach[t, j] = 1`` when label ``j`` is term ``t`` or one of its
        descendants (its first ``C`` rows are :func:`reachability`).
    depth
        Number of ancestors of each term (deeper = more specific).
    """
    ontology.check_terms(labels)
    own = set(labels)
    ancestors = [ontology.ancestors(term) for term in labels]
    counts = Counter(a for above in ancestors for a in above if a.startswith("CL:") and a not in own)
    shared = sorted(a for a, n in counts.items() if n >= 2)
    terms = [*labels, *shared]
    reach = np.array([[term == label or term in above for label, above in zip(labels, ancestors, strict=True)] for term in terms],
                     dtype=np.float32).reshape(len(terms), len(labels))
    depth = np.array([len(ontology.ancestors(term)) for term in terms], dtype=np.float64)
    return terms, reach, depth


def source_reachability(R: np.ndarray, codes: np.ndarray, sources: np.ndarray, n_sources: int | None = None) -> np.ndarray:
    """What each label means in each source: one reachability matrix per source.

    Within a source, a label whose descendants that source also uses as labels means "this
    term and not those labelled descendants" (nor anything below them); a label whose
    descendants the source never uses keeps HCE's "this term or any descendant". A flat author
    partition (one source, CD14 and CD16 monocytes both labelled) thus trains as plain
    cross-entropy, while a coarse label of one study is still satisfied by the fine classes
    another study labels.

    Parameters
    ----------
    R
        ``(C, C)`` ontology reachability of the classes (:func:`reachability`).
    codes
        Class index of each labelled cell.
    sources
        Source (dataset / study) index of each cell, ``0 .. n_sources-1``.
    n_sources
        Number of sources (default ``sources.max() + 1``).

    Returns
    -------
    ``(n_sources, C, C)`` float32; row ``i`` of matrix ``s`` lists the classes that satisfy
    target ``i`` in source ``s``.
    """
    n_sources = int(n_sources if n_sources is not None else (sources.max() + 1 if len(sources) else 1))
    out = np.repeat(np.asarray(R, dtype=np.float32)[None], n_sources, axis=0)
    for s in range(n_sources):
        used = np.unique(codes[sources == s])
        for i in used:
            below = [k for k in used if k != i and R[i, k] > 0]
            if below:
                out[s, i, R[below].max(axis=0) > 0] = 0.0
    return out


def nested_label_pairs(R: np.ndarray, codes: np.ndarray, sources: np.ndarray) -> list[tuple[int, int, int, bool]]:
    """Ancestor / descendant pairs among the labels, per source.

    Returns
    -------
    ``(ancestor, descendant, source, exclusive)`` for every pair of classes where the ancestor
    is used as a label in the source and the descendant is used in any source; ``exclusive`` is
    true when that same source labels the descendant or one of its ancestors below the ancestor
    label (the ancestor then means "not it", as in :func:`source_reachability`).
    """
    pairs = []
    everywhere = np.unique(codes)
    for s in np.unique(sources):
        used = np.unique(codes[sources == s])
        for i in used:
            labelled_below = used[(R[i, used] > 0) & (used != i)]
            below = everywhere[(R[i, everywhere] > 0) & (everywhere != i)]
            pairs += [(int(i), int(j), int(s), bool((R[labelled_below, j] > 0).any())) for j in below]
    return pairs


def coarse_exclusions(R: np.ndarray, per_source: np.ndarray, codes: np.ndarray, sources: np.ndarray) -> list[tuple[int, int, int]]:
    """``(source, ancestor, descendant)`` where a source's label becomes a class of its own only by excluding a descendant label that the same source uses coarsely.

    The source then reads its ancestor label as "this term and not the descendant" with no other
    class left to satisfy it, while its descendant label is satisfied by finer classes that other
    sources label. That is what a source relabelled one level up looks like (the Cell Ontology
    parent of "CD14-low, CD16-positive monocyte" is "CD14-positive monocyte", whose parent is
    "monocyte"); the per-source rule cannot tell it from a real third class, so callers say so.
    """
    found = []
    for s in np.unique(sources):
        used = np.unique(codes[sources == s])
        coarse = [j for j in used if per_source[s, j].sum() > 1]
        found += [(int(s), int(i), int(j)) for i in used if per_source[s, i].sum() <= 1 for j in coarse if i != j and R[i, j] > 0]
    return found


def fine_classes(R: np.ndarray, codes: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Classes that a finest-class call may return: those some source separates from every finer label.

    A class is fine when a source that labels it also labels every class below it that any
    source labels, so that source draws each line between them (a single source always does).
    A label that no source separates from a finer one is coarse and never a finest call: a
    study's "T cell" beside another study's CD4 / CD8 T cells, and also a label that the
    per-source rule learns as a class of its own only by excluding a descendant its source uses
    coarsely (:func:`coarse_exclusions`: a source relabelled one level up uses "monocyte" beside
    "CD14-positive monocyte" but never names the CD16 monocytes below both).

    Parameters
    ----------
    R
        ``(C, C)`` ontology reachability of the classes (:func:`reachability`).
    codes
        Class index of each labelled cell.
    sources
        Source index of each cell.

    Returns
    -------
    ``(C,)`` bool.
    """
    C = R.shape[0]
    labelled = np.zeros(C, dtype=bool)
    labelled[np.unique(codes)] = True
    finer = (np.asarray(R) > 0) & ~np.eye(C, dtype=bool) & labelled[None, :]
    fine = ~labelled
    for s in np.unique(sources):
        used = np.zeros(C, dtype=bool)
        used[np.unique(codes[sources == s])] = True
        fine |= used & ~(finer & ~used[None, :]).any(axis=1)
    return fine


def map_author_labels(values: Iterable[str], table: pd.DataFrame | str | Path, ontology: CellOntology | None = None) -> np.ndarray:
    """Map author labels to CL ids with a user table of two columns (author label, CL id).

    Raises
    ------
    InputError
        Naming every label the table does not map, and every id that is not a valid CL term.
    """
    source = str(table) if not isinstance(table, pd.DataFrame) else "mapping table"
    if not isinstance(table, pd.DataFrame):
        table = pd.read_csv(table)
    if table.shape[1] < 2:
        raise InputError(f"{source}: needs two columns (author label, Cell Ontology id)")
    mapping = dict(zip(table.iloc[:, 0].astype(str), table.iloc[:, 1].astype(str), strict=True))
    values = np.asarray(list(values), dtype=str)
    missing = sorted(str(v) for v in set(values) - set(mapping))
    if missing:
        raise InputError(f"{source}: no Cell Ontology id for labels {missing}")
    ids = np.array([mapping[v] for v in values])
    if ontology is not None:
        ontology.check_terms(ids, where=f"{source}: ")
    return ids


def hierarchical_calls(proba: np.ndarray, R: np.ndarray, depth: np.ndarray, threshold: float) -> np.ndarray:
    """The deepest term whose probability, summed over the classes it covers, reaches ``threshold``.

    Parameters
    ----------
    proba
        ``(n, C)`` class probabilities.
    R
        ``(T, C)`` reachability of the candidate terms (``R[t, j] = 1``: class ``j`` is term ``t``
        or a descendant): the classes' own ``(C, C)`` :func:`reachability`, or :func:`call_terms`'s.
    depth
        Ontology depth of each term (number of ancestors); deeper = more specific.
    threshold
        Probability a call must reach. A cell where no term reaches it gets the term of largest
        summed probability (the broadest one).

    Returns
    -------
    Term index of each cell's call (ties in depth go to the larger summed probability).
    """
    q = proba @ R.T
    reach = q >= threshold
    score = np.where(reach, depth[None, :] * 2.0 + q, -np.inf)  # depth first, q (< 2) breaks ties
    calls = score.argmax(1)
    none = ~reach.any(1)
    calls[none] = q[none].argmax(1)
    return calls


def choose_call_threshold(proba: np.ndarray, truth: np.ndarray, R: np.ndarray, depth: np.ndarray, precision: float = 0.95,
                          grid: np.ndarray | None = None, satisfies: np.ndarray | None = None) -> float:
    """Smallest threshold whose hierarchical calls on held-out cells are correct (the truth or an ancestor of it) at ``precision``.

    ``satisfies``: optional ``(n, C)`` boolean matrix of the classes that satisfy each held-out
    cell's label in its source (:meth:`~scatlas.tl._labels.LabelSpace.satisfying`); a call
    that satisfies it is then correct too, so a finer call on a coarsely labelled cell counts as
    right (scTab's descendant credit) instead of pushing the threshold up.
    Returns the largest grid value when none reaches ``precision``.
    """
    grid = np.round(np.arange(0.5, 1.0, 0.01), 2) if grid is None else grid
    for t in grid:
        calls = hierarchical_calls(proba, R, depth, float(t))
        correct = R[calls, truth] > 0
        if satisfies is not None:  # only a class (the first C terms) can satisfy a label by being finer than it
            inside = calls < satisfies.shape[1]
            correct[inside] |= satisfies[np.flatnonzero(inside), calls[inside]]
        if correct.mean() >= precision:
            return float(t)
    return float(grid[-1])

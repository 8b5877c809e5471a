"""The label space of a classifier: class order, readable names, and what each label means in each source.

With the Cell Ontology, a label whose descendants its source also uses means "this term and not
those descendants" (:func:`~scatlas.ontology.source_reachability`); :class:`LabelSpace` carries
those per-source matrices (what hierarchical cross-entropy trains with), the classes a
finest-class call may return and the terms a hierarchical call may back off to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from scatlas.ontology import (CellOntology, call_terms, choose_call_threshold, coarse_exclusions, fine_classes, hierarchical_calls, nested_label_pairs,
                              reachability, source_reachability)
from scatlas.tl._embed import categorical_codes


@dataclass
class LabelSpace:
    """Class order, readable names, the ontology hierarchy and what each label means in each source.

    Attributes
    ----------
    classes, names
        Class ids (CL ids with an ontology) and readable names, in model output order.
    reachability
        ``(C, C)`` ontology reachability (``None`` without an ontology).
    ontology_version
        Version of the ontology used.
    sources
        Source (dataset / study) names; one ``"all"`` source unless a dataset key is given.
    per_source
        ``(S, C, C)`` label meaning per source (:func:`~scatlas.ontology.source_reachability`), the
        matrices hierarchical cross-entropy trains with.
    fine
        Classes a finest-class call may return (:func:`~scatlas.ontology.fine_classes`: some source
        separates them from every finer label).
    nested
        Ancestor / descendant label pairs (:func:`~scatlas.ontology.nested_label_pairs`) as a table.
    call_terms, call_names
        What a hierarchical call may return (CL ids, readable names): the classes, then the
        ontology terms above two or more of them (:func:`~scatlas.ontology.call_terms`).
    call_reach
        ``(T, C)``: ``call_reach[t, j] = 1`` when class ``j`` is call term ``t`` or below it.
    call_depth
        Ontology depth (number of ancestors) of each call term.
    call_threshold
        Probability a hierarchical call must reach, chosen on held-out cells
        (:func:`~scatlas.ontology.choose_call_threshold`); ``None`` until chosen.
    """

    classes: list[str]
    names: list[str]
    reachability: np.ndarray | None
    ontology_version: str | None
    sources: list[str] = field(default_factory=lambda: ["all"])
    per_source: np.ndarray | None = None
    fine: np.ndarray | None = None
    nested: pd.DataFrame = field(default_factory=pd.DataFrame)
    call_terms: list[str] | None = None
    call_names: list[str] | None = None
    call_reach: np.ndarray | None = None
    call_depth: np.ndarray | None = None
    call_threshold: float | None = None

    def codes(self, values: np.ndarray) -> np.ndarray:
        """Integer code of each label (−1 for labels outside the class set)."""
        return np.asarray(pd.Categorical(np.asarray(values, dtype=str), categories=self.classes).codes, dtype=np.int64)

    def source_codes(self, values: np.ndarray | None, n: int) -> np.ndarray | None:
        """Source index of each of ``n`` cells (``values``: their source names; ``None``: the one source); ``None`` without an ontology."""
        if self.per_source is None:
            return None
        if values is None:
            return np.zeros(n, dtype=np.int64)
        return np.maximum(pd.Index(self.sources).get_indexer(np.asarray(values, dtype=str)), 0).astype(np.int64)

    def calls(self, proba: np.ndarray) -> pd.DataFrame | None:
        """Each cell's hierarchical call, the deepest term reaching :attr:`call_threshold`, as columns
        ``id``, ``name`` and ``depth``; ``None`` without calls."""
        if self.call_threshold is None or self.call_reach is None or self.call_depth is None or self.call_terms is None or self.call_names is None:
            return None
        index = hierarchical_calls(proba, self.call_reach, self.call_depth, self.call_threshold)
        return pd.DataFrame({"id": np.asarray(self.call_terms)[index], "name": np.asarray(self.call_names)[index], "depth": self.call_depth[index]})

    def calls_right(self, call_ids: np.ndarray, truth: np.ndarray) -> np.ndarray:
        """Whether each hierarchical call (CL id) is the true class (index) or an ancestor of it."""
        if self.call_reach is None:
            raise ValueError("this label space makes no hierarchical calls")
        index = pd.Index(self.call_terms or []).get_indexer(np.asarray(call_ids, dtype=str))
        return (index >= 0) & (self.call_reach[np.maximum(index, 0), truth] > 0)

    def satisfying(self, codes: np.ndarray, source_codes: np.ndarray | None) -> np.ndarray:
        """What held-out cells are scored against: their class indices, or with an ontology the ``(n, C)`` classes that satisfy each cell's label in its source.

        A coarse label (one its source uses without its labelled descendants) is satisfied by
        the finer classes below it, so calibration and the call threshold do not count a finer
        prediction on a coarsely labelled cell as wrong.
        """
        if self.per_source is None or source_codes is None:
            return np.asarray(codes)
        return self.per_source[source_codes, codes] > 0

    def with_call_threshold(self, proba: np.ndarray, truth: np.ndarray, precision: float, source_codes: np.ndarray | None = None) -> LabelSpace:
        """This label space with :attr:`call_threshold` chosen on held-out cells (probabilities, true class indices,
        their source indices for :meth:`satisfying`); unchanged without an ontology."""
        if self.call_reach is None or self.call_depth is None or not len(truth):
            return self
        satisfies = self.satisfying(truth, source_codes)
        return replace(self, call_threshold=choose_call_threshold(proba, truth, self.call_reach, self.call_depth, precision,
                                                                  satisfies=satisfies if satisfies.ndim == 2 else None))

    def finest(self, proba: np.ndarray) -> np.ndarray:
        """Index of the finest-class call of each cell: the argmax over :attr:`fine` classes."""
        if self.fine is None or self.fine.all():
            return proba.argmax(1)
        return np.where(self.fine, proba, -np.inf).argmax(1)


def look_alike(classes: Sequence[str]) -> list[list[str]]:
    """Groups of class names equal once spaces are collapsed and case ignored (``'B cell '``, ``'B cell'``, ``'b cell'``): likely one type."""
    groups: dict[str, list[str]] = {}
    for name in classes:
        groups.setdefault(" ".join(name.split()).casefold(), []).append(str(name))
    return [group for group in groups.values() if len(group) > 1]


def label_space(values: np.ndarray, names: np.ndarray | None, ontology: CellOntology | None, where: str = "", sources: np.ndarray | None = None,
                log: Callable[[str], None] | None = None) -> LabelSpace:
    """Sorted classes of ``values``; with an ontology, validated CL ids, their reachability and each label's meaning per source.

    Parameters
    ----------
    values
        Label (CL id) of each training cell.
    names
        Readable name of each cell's label, or ``None`` (names from the ontology).
    ontology
        The Cell Ontology, or ``None`` for flat labels.
    where
        Prefix of error messages (file, column).
    sources
        Source (dataset / study) of each cell; ``None``: one source.
    log
        Receives one line naming every ancestor / descendant label pair and how each source treats it.
    """
    values = np.asarray(values, dtype=str)
    classes = sorted(set(values))
    if log is not None and (alike := look_alike(classes)):
        log(f"{where}labels that differ only in spaces or case are kept apart as classes: "
            + "; ".join(" / ".join(repr(c) for c in group) for group in alike) + " (give each type one spelling if they are one)")
    if ontology is None:
        if sources is not None and log is not None:
            log(f"{where}flat labels (no ontology key): the sources of the dataset key are not used; they set what each source's labels "
                "mean over the Cell Ontology, for HCE and hierarchical calls")
        return LabelSpace(classes, classes, None, None)
    ontology.check_terms(classes, where=where)
    lookup = dict(zip(values, np.asarray(names, dtype=str), strict=True)) if names is not None else {}
    readable = [lookup.get(c) or ontology.label(c) for c in classes]
    R = reachability(classes, ontology)
    source_codes, source_names = (np.zeros(len(values), dtype=np.int64), ["all"]) if sources is None else categorical_codes(np.asarray(sources, dtype=str))
    codes = np.asarray(pd.Categorical(values, categories=classes).codes, dtype=np.int64)
    per_source = source_reachability(R, codes, source_codes, len(source_names))
    nested = pd.DataFrame(
        [{"source": source_names[s], "ancestor": classes[i], "ancestor_name": readable[i], "descendant": classes[j], "descendant_name": readable[j],
          "meaning": f"'{readable[i]}' excludes '{readable[j]}'" if exclusive else f"'{readable[i]}' is satisfied by '{readable[j]}'"}
         for i, j, s, exclusive in nested_label_pairs(R, codes, source_codes)])
    if log is not None and len(nested):
        log(f"{where}labels nest in the Cell Ontology: " + "; ".join(f"[{r.source}] {r.meaning}" for r in nested.itertuples())
            + " (within a source, a label whose descendants it also uses means 'not those descendants')")
    ambiguous = coarse_exclusions(R, per_source, codes, source_codes)
    if log is not None and ambiguous:
        log(f"{where}" + "; ".join(f"[{source_names[s]}] '{readable[i]}' is learnt as a class of its own, 'not {readable[j]}', while that source "
                                   f"uses '{readable[j]}' coarsely (other sources label classes below it)" for s, i, j in ambiguous)
            + ": it is never a finest-class call, only a hierarchical one; if these are the same cells labelled less specifically, give them one label")
    terms, reach, depth = call_terms(classes, ontology)
    return LabelSpace(classes, readable, R, ontology.version, source_names, per_source, fine_classes(R, codes, source_codes), nested,
                      terms, [*readable, *(ontology.label(t) for t in terms[len(classes):])], reach, depth)

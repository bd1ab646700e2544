"""Similar and contrasting anonymized cases for a query image (``casemask similar``,
``POST /api/v1/similar``): the case-based explanation of Montenegro & Cardoso.

The query is one DICOM object held in memory: it goes through the pixel step's
preprocessing and the model that made the index (``node.index``), and its medical vector
is compared by cosine with the indexed cases of the same weights
(``engine.retrieval.CaseBase``). The answer names each case by its pseudonymous UIDs,
label, similarity and where it can be fetched (each destination of its route, the state
of its delivery there, and the WADO-RS URL for a DICOMweb destination). Nothing of the
query is written anywhere, logged or indexed, and the answer carries none of its header.

:func:`panel_png` draws the query and its cases as a PNG for a person to look at; the
cases' pixels come from the copies the node can read (its outbox, a folder destination).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import Dataset, dcmread
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from node.config import Settings, hide_credentials
from node.db import Delivery, IndexEntry, Output, data_path
from node.index import Cases, check_modality, describe, entries, load_case_base, model_input, weights_of
from node.pixels import PixelError
from node.spool import digest

if TYPE_CHECKING:
    from engine.api import Model

log = logging.getLogger(__name__)

MAX_K = 100


class QueryError(ValueError):
    """The query cannot be answered; the message says why (no value of the query's header)."""


@dataclasses.dataclass
class Query:
    """What the model reads in the query image: never stored."""

    image: np.ndarray  # (S, S) in [-1, 1], the model's input
    medical: np.ndarray  # (med_dim,)
    probabilities: np.ndarray  # (classes,)
    frames: int

    @property
    def label(self) -> int:
        return int(self.probabilities.argmax())


class SimilarService:
    """Answers similar-case queries against a node's index.

    ``load(model name)`` gives a loaded model (``engine.load_model`` of the ``[[models]]``
    entry); models and the searchable case bases are kept between queries, a case base
    until the index changes.
    """

    def __init__(self, settings: Settings, sessions: sessionmaker, load: Callable[[str], Model], approximate: str = "auto") -> None:
        self.settings = settings
        self.sessions = sessions
        self._load = load
        self.approximate = approximate
        self._models: dict[str, Model] = {}
        self._cases: dict[tuple[str, str], tuple[tuple[int, int], Cases]] = {}
        self._lock = threading.Lock()

    # -- which model --------------------------------------------------------------------
    def model_name(self, requested: str | None = None) -> str:
        """The model whose index a query searches: ``requested``, else the one model of
        the routes with ``index = true``, else the one model the index holds entries of.

        Raises:
            QueryError: none, or several to choose from.
        """
        if requested:
            try:
                self.settings.model(requested)
            except KeyError:
                raise QueryError(f"model {requested!r} is not defined in [[models]]") from None
            return requested
        names = sorted({r.model for r in self.settings.routes if r.index})
        if not names:
            with self.sessions() as s:
                names = sorted(set(s.scalars(select(IndexEntry.model).distinct())))
        if len(names) == 1:
            return names[0]
        if not names:
            raise QueryError("nothing is indexed: no route has index = true and the index is empty")
        raise QueryError(f"the index holds cases of several models ({', '.join(names)}): name one with --model")

    def model(self, name: str) -> Model:
        with self._lock:
            if name not in self._models:
                self._models[name] = self._load(name)
            return self._models[name]

    # -- the query ----------------------------------------------------------------------
    def encode(self, data: bytes | Dataset, model: Model) -> Query:
        """The query's model input and what the model reads in it (first frame).

        Raises:
            QueryError: not DICOM, or pixels the model cannot take.
        """
        # pydicom's warnings about odd values quote the values: none of the query's may
        # reach a terminal or a log
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(data, Dataset):
                ds = data
            else:
                try:
                    ds = dcmread(io.BytesIO(data))
                except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad input
                    raise QueryError(f"the query is not a DICOM file pydicom can read ({type(exc).__name__})") from None
            if "PixelData" not in ds:
                raise QueryError("the query has no pixel data")
            try:
                check_modality(ds, model)
                x = model_input(ds, model.image_size)
            except PixelError as exc:
                raise QueryError(f"the query cannot go through the model: {exc}") from None
        medical, probs = describe(model, x[:1])
        return Query(image=x[0, 0], medical=medical[0], probabilities=probs[0], frames=len(x))

    def cases(self, name: str, model: Model) -> Cases:
        """The searchable entries of ``name`` made by ``model``'s weights (cached until the
        index changes)."""
        key = (name, weights_of(model))
        with self.sessions() as s:
            stamp = s.execute(select(func.count(), func.max(IndexEntry.id)).where(IndexEntry.model == key[0], IndexEntry.weights == key[1])).one()
            stamp = (int(stamp[0]), int(stamp[1] or 0))
            with self._lock:
                cached = self._cases.get(key)
                if cached is not None and cached[0] == stamp:
                    return cached[1]
            cases = load_case_base(s, *key, approximate=self.approximate)
        with self._lock:
            self._cases[key] = (stamp, cases)
        return cases

    def similar(self, data: bytes | Dataset, k: int = 5, contrast: bool = False, model: str | None = None) -> tuple[dict[str, Any], Query]:
        """The ``k`` nearest indexed cases to the query (and with ``contrast`` the ``k``
        nearest whose label differs from the query's), as a JSON-ready answer, with the
        encoded query (for :func:`panel_png`; the caller drops it).

        Raises:
            QueryError: a bad query, ``k`` out of range, or no model to search with.
        """
        if not 1 <= k <= MAX_K:
            raise QueryError(f"k must be 1 to {MAX_K}")
        name = self.model_name(model)
        m = self.model(name)
        q = self.encode(data, m)
        cases = self.cases(name, m)
        classes = list(m.classes)
        found = {"similar": cases.base.nearest(q.medical, k)}
        if contrast:
            found["contrasting"] = cases.base.nearest(q.medical, k, exclude_label=q.label)
        with self.sessions() as s:
            other = sum(n for (mn, w), n in _counts(s, name).items() if w != weights_of(m))
            hit_entries = entries(s, [cases.ids[h.row] for hits in found.values() for h in hits])
            where = self._where(s, list(hit_entries.values()))
        answer: dict[str, Any] = {
            "query": {"label": classes[q.label], "probabilities": _probs(q.probabilities, classes), "frames": q.frames, "frame_used": 1},
            "model": {"name": name, "bundle": m.bundle.meta.get("name", ""), "weights": weights_of(m)},
            "index": {"cases": cases.base.size, "search": "+".join(sorted(cases.base.kinds)) or "exact",
                      "other_weights": other, **({"note": "entries made by other weights are not searched: run casemask index rebuild"} if other else {})},
        }
        for part, hits in found.items():
            answer[part] = [self._case(rank + 1, hit_entries[int(cases.ids[h.row])], h.similarity, classes, where) for rank, h in enumerate(hits)]
        log.info("similar cases: model %s, %d cases searched, %d similar%s", name, cases.base.size, len(found["similar"]),
                 f", {len(found['contrasting'])} contrasting" if contrast else "")
        return answer, q

    def _where(self, session, entries: list[IndexEntry]) -> dict[int, dict[str, Any]]:
        """output id -> {"path": outbox file, "deliveries": {destination: state}}."""
        ids = sorted({e.output_id for e in entries if e.output_id is not None})
        out: dict[int, dict[str, Any]] = {i: {"path": "", "deliveries": {}} for i in ids}
        if not ids:
            return out
        for o in session.scalars(select(Output).where(Output.id.in_(ids))):
            out[o.id]["path"] = str(data_path(self.settings.node.data_dir, o.path))
        for d in session.scalars(select(Delivery).where(Delivery.output_id.in_(ids))):
            out[d.output_id]["deliveries"][d.destination] = str(d.state.value if hasattr(d.state, "value") else d.state)
        return out

    def _case(self, rank: int, e: IndexEntry, similarity: float, classes: list[str], where: dict[int, dict[str, Any]]) -> dict[str, Any]:
        states = where.get(e.output_id or -1, {}).get("deliveries", {})
        fetch = []
        for name in json.loads(e.destinations or "[]"):
            item: dict[str, Any] = {"destination": name, "state": states.get(name, "")}
            try:
                dest = self.settings.destination(name)
            except KeyError:
                item["kind"] = "no longer configured"
            else:
                item["kind"] = dest.kind
                if dest.kind == "dicomweb":
                    item["wado_rs"] = f"{hide_credentials(dest.url).rstrip('/')}/studies/{e.study_uid}/series/{e.series_uid}/instances/{e.sop_uid}"
                elif dest.kind == "dicom":
                    item["ae_title"] = dest.ae_title
            fetch.append(item)
        return {
            "rank": rank, "similarity": round(similarity, 6), "label": classes[e.label] if e.label < len(classes) else str(e.label),
            "probabilities": _probs(np.frombuffer(e.probabilities, np.float32), classes),
            "study_uid": e.study_uid, "series_uid": e.series_uid, "sop_uid": e.sop_uid, "frame": e.frame + 1, "route": e.route,
            "fetch": fetch, "_output_id": e.output_id,
        }

    # -- the panel ------------------------------------------------------------------------
    def case_image(self, case: dict[str, Any], model: Model) -> np.ndarray | None:
        """The case's pixels as the model sees them, from a copy the node can read: its
        outbox file, else a folder destination's; None when neither is here."""
        paths = []
        with self.sessions() as s:
            out = s.get(Output, case["_output_id"]) if case.get("_output_id") else None
            if out is not None:
                paths.append(data_path(self.settings.node.data_dir, out.path))
        for f in case["fetch"]:
            if f.get("kind") == "folder":
                dest = self.settings.destination(f["destination"])
                # named as node.spool.folder_path names it
                paths.append(Path(dest.path) / digest(case["study_uid"]) / digest(case["series_uid"]) / f"{digest(case['sop_uid'])}.dcm")  # type: ignore[arg-type]
        for p in paths:
            if not p.is_file():
                continue
            try:
                ds = dcmread(p)
                if str(ds.get("SOPInstanceUID", "")) != case["sop_uid"]:
                    continue
                return model_input(ds, model.image_size)[case["frame"] - 1, 0]
            except (OSError, ValueError, PixelError, IndexError) as exc:
                log.warning("similar: a copy of a case could not be read (%s)", type(exc).__name__)
        return None


def _counts(session, model_name: str) -> dict[tuple[str, str], int]:
    rows = session.execute(select(IndexEntry.model, IndexEntry.weights, func.count()).where(IndexEntry.model == model_name).group_by(IndexEntry.model, IndexEntry.weights))
    return {(m, w): n for m, w, n in rows}


def _probs(p: np.ndarray, classes: list[str]) -> dict[str, float]:
    return {c: round(float(v), 4) for c, v in zip(classes, p)}


def public(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer without the node's internal keys (those starting with ``_``)."""
    return {k: ([{kk: vv for kk, vv in c.items() if not kk.startswith("_")} for c in v] if k in ("similar", "contrasting") else v)
            for k, v in answer.items()}


def text(answer: dict[str, Any]) -> str:
    """The answer as lines for a terminal."""
    q, m, idx = answer["query"], answer["model"], answer["index"]
    probs = ", ".join(f"{c} {p:.2f}" for c, p in q["probabilities"].items())
    lines = [f"query: {q['label']} ({probs}); model {m['name']} (weights {m['weights']}); {idx['cases']} cases searched ({idx['search']})"]
    if idx.get("other_weights"):
        lines.append(f"  {idx['other_weights']} entries made by other weights were not searched: run casemask index rebuild")
    for part, title in (("similar", "similar cases"), ("contrasting", "contrasting cases (another label)")):
        if part not in answer:
            continue
        lines.append(f"{title}:")
        if not answer[part]:
            lines.append("  none")
        for c in answer[part]:
            where = "; ".join(f"{f['destination']} ({f['kind']}{', ' + f['state'] if f['state'] else ''})" + (f" {f['wado_rs']}" if f.get("wado_rs") else "")
                              for f in c["fetch"])
            lines.append(f"  {c['rank']:>2}  {c['similarity']:.3f}  {c['label']:<10} study {c['study_uid']}  series {c['series_uid']}  instance {c['sop_uid']}"
                         + (f" frame {c['frame']}" if c["frame"] > 1 else "") + f"  at {where}")
    return "\n".join(lines)


def panel_png(query: np.ndarray, answer: dict[str, Any], images: dict[str, list[np.ndarray | None]]) -> bytes:
    """A PNG: the query, then a row of its similar cases (and a row of contrasting ones),
    each tile with its rank, label and similarity; a case whose pixels are not at hand
    is a grey tile saying so.

    ``query``: (S, S) in [-1, 1]; ``images``: per part of ``answer``, one array or None
    per case.

    Raises:
        QueryError: Pillow is not installed.
    """
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise QueryError("--png needs Pillow (pip install pillow)") from None
    scale = 3
    s = query.shape[-1] * scale
    pad, cap = 6, 30
    parts = [p for p in ("similar", "contrasting") if p in answer]
    cols = 1 + max([len(answer[p]) for p in parts] + [1])
    width = cols * (s + pad) + pad
    height = len(parts) * (s + cap + pad) + pad + 16
    img = Image.new("L", (width, height), 24)
    draw = ImageDraw.Draw(img)

    def tile(arr: np.ndarray | None, x: int, y: int, caption: list[str]) -> None:
        if arr is None:
            draw.rectangle([x, y, x + s - 1, y + s - 1], fill=80)
            draw.text((x + 4, y + s // 2 - 6), "not at hand", fill=220)
        else:
            t = Image.fromarray(((np.clip(arr, -1, 1) + 1) * 127.5).astype(np.uint8)).resize((s, s), Image.NEAREST)
            img.paste(t, (x, y))
        for j, c in enumerate(caption):
            draw.text((x, y + s + 2 + 12 * j), c, fill=235)

    draw.text((pad, 2), f"model {answer['model']['name']} ({answer['model']['weights']}); {answer['index']['cases']} cases; cosine of medical vectors", fill=235)
    for r, part in enumerate(parts):
        y = 16 + pad + r * (s + cap + pad)
        if r == 0:
            tile(query, pad, y, [f"query: {answer['query']['label']}", f"p {max(answer['query']['probabilities'].values()):.2f}"])
        else:
            draw.text((pad, y + s // 2), "contrasting:", fill=235)
        for c, (case, arr) in enumerate(zip(answer[part], images.get(part, []))):
            tile(arr, pad + (c + 1) * (s + pad), y, [f"#{case['rank']} {case['label']}", f"sim {case['similarity']:.3f}"])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def panel_for(service: SimilarService, answer: dict[str, Any], query: Query) -> bytes:
    """:func:`panel_png` with each case's pixels read by :meth:`SimilarService.case_image`."""
    m = service.model(answer["model"]["name"])
    images = {p: [service.case_image(c, m) for c in answer[p]] for p in ("similar", "contrasting") if p in answer}
    return panel_png(query.image, answer, images)

"""``casemask similar`` and ``casemask index rebuild|status``: the CLI of the index of
similar cases (node.index, node.similar)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _open(args):
    from node.cli import _require_database, _settings
    from node.db import make_engine, make_sessionmaker

    settings = _settings(args)
    _require_database(settings)
    engine = make_engine(settings.node.resolved_database_url)
    return settings, engine, make_sessionmaker(engine)


def cmd_similar(args) -> int:
    from node.index import model_loader
    from node.similar import QueryError, SimilarService, panel_for, public, text

    path = Path(args.file)
    if not path.is_file():
        print(f"casemask similar: {path}: no such file", file=sys.stderr)
        return 2
    settings, engine, sessions = _open(args)
    try:
        service = SimilarService(settings, sessions, model_loader(settings), approximate=args.approximate)
        try:
            answer, query = service.similar(path.read_bytes(), k=args.k, contrast=args.contrast, model=args.model)
            png = panel_for(service, answer, query) if args.png else None
        except QueryError as exc:
            print(f"casemask similar: {exc}", file=sys.stderr)
            return 1
        del query  # the query's pixels go no further than the panel the user asked for
        if png is not None:
            Path(args.png).write_bytes(png)
        print(json.dumps(public(answer), indent=1) if args.json else text(answer))
        if png is not None and not args.json:
            print(f"panel: {args.png}")
        return 0
    finally:
        engine.dispose()


def cmd_index_rebuild(args) -> int:
    from node.index import model_loader, rebuild

    settings, engine, sessions = _open(args)
    try:
        if not any(r.index for r in settings.routes) and not args.route:
            print("casemask index rebuild: no route has index = true", file=sys.stderr)
            return 2
        try:
            reports = rebuild(settings, sessions, model_loader(settings), args.route, force=args.force,
                              on_progress=lambda n, total: print(f"  {n} of {total}", file=sys.stderr))
        except (KeyError, ValueError) as exc:
            print(f"casemask index rebuild: {exc}", file=sys.stderr)
            return 2
        for rep in reports:
            print(rep.line())
        return 0
    finally:
        engine.dispose()


def cmd_index_status(args) -> int:
    from node.index import counts

    settings, engine, sessions = _open(args)
    try:
        with sessions() as s:
            c = counts(s)
        rows = [{"model": m, "weights": w, "entries": n} for (m, w), n in sorted(c.items())]
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            for r in rows:
                print(f"model {r['model']}  weights {r['weights']}  {r['entries']} entries")
            if not rows:
                indexed = [r.name for r in settings.routes if r.index]
                print(f"no entries yet: routes with index = true: {', '.join(indexed)} (each anonymized output is indexed as it is "
                      "made; casemask index rebuild for earlier ones)" if indexed else
                      "no entries: no route has index = true (docs/retrieval.md)")
        return 0
    finally:
        engine.dispose()


def add_index_parsers(sub, with_config) -> None:
    """Add ``similar`` and ``index`` to the ``casemask`` command's subparsers."""
    sp = with_config(sub.add_parser("similar", help="the indexed anonymized cases nearest to an image (cosine of the medical vector)"))
    sp.add_argument("file", metavar="FILE", help="a DICOM image: read, never stored, logged or indexed")
    sp.add_argument("--k", type=int, default=5, help="how many cases (1 to 100)")
    sp.add_argument("--contrast", action="store_true", help="also the nearest cases whose label differs from the query's")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--png", metavar="OUT.png", help="draw the query and its cases as a panel")
    sp.add_argument("--model", metavar="NAME", help="the [[models]] entry whose index to search (default: that of the routes with index = true)")
    sp.add_argument("--approximate", choices=("auto", "always", "never"), default="never",
                    help="approximate (faiss HNSW) search: auto uses it above 10^6 cases when faiss-cpu is installed; building it costs about 50 s per 10^5 cases")
    sp.set_defaults(func=cmd_similar)

    sp = sub.add_parser("index", help="the index of similar cases")
    isub = sp.add_subparsers(dest="index_command", metavar="SUBCOMMAND", required=True)
    rb = with_config(isub.add_parser("rebuild", help="encode the anonymized outputs again with each route's current model (after a model change)",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Reads each output from the outbox while the file is there (the exact bytes sent), else from a folder "
                                                 "destination's copy. Outputs that retention deleted and no folder destination holds cannot be read back "
                                                 "(DICOM and DICOMweb destinations are not fetched from): their stale entries are removed."))
    rb.add_argument("--route", action="append", metavar="NAME", help="only this route (repeatable)")
    rb.add_argument("--force", action="store_true", help="also encode outputs already indexed by the current weights")
    rb.set_defaults(func=cmd_index_rebuild)
    st = with_config(isub.add_parser("status", help="entries per model and weights"))
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_index_status)

"""JSON API under /api/v1: every route calls the service layer with the caller's
principal (bearer token); roles: viewer reads, operator acts on the queue, admin changes
the configuration and exports the pseudonym mapping."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from node import audit
from node.accounts import Principal
from node.db import Role
from node.http.auth import MAX_ROW_ID, RowId, RowIdQuery, api_role, client_host, context
from node.similar import MAX_K

router = APIRouter(prefix="/api/v1")
viewer = Depends(api_role(Role.VIEWER))
operator = Depends(api_role(Role.OPERATOR))
admin = Depends(api_role(Role.ADMIN))

MAX_UPLOAD = 256 * 2**20  # bytes of one file to explain
MAX_QUERY = 256 * 2**20  # bytes of one similar-case query
MAX_CONFIG = 2**20  # bytes of a configuration sent to check or save (a site's file is a few KiB)


def svc(request: Request):
    return context(request).service


@router.get("/status", tags=["status"])
def status(request: Request, who: Principal = viewer) -> dict[str, Any]:
    """Counts per state and per destination, models (backend, device), disk free, version."""
    out = svc(request).status()
    out["destinations"] = svc(request).destinations()
    return out


@router.get("/studies", tags=["studies"])
def studies(request: Request, state: str = Query("", description="RECEIVING | ROUTED | DONE | PARTIAL | QUARANTINED | HELD | IGNORED"), limit: int = Query(100, ge=1, le=1000),
            offset: int = Query(0, ge=0, le=MAX_ROW_ID), who: Principal = viewer) -> list[dict[str, Any]]:
    """Studies, newest first (pseudonymous: row id and the Study Instance UID the archive receives)."""
    try:
        return svc(request).studies(state, limit, offset)
    except ValueError:
        raise HTTPException(422, "state: choose one of RECEIVING, ROUTED, DONE") from None


@router.get("/studies/{study_id}", tags=["studies"])
def study(request: Request, study_id: RowId, who: Principal = viewer) -> dict[str, Any]:
    """One study's path: jobs per route with states and reasons, outputs, deliveries, audit timeline."""
    return svc(request).study(study_id)


@router.get("/quarantine", tags=["queue"])
def quarantine(request: Request, limit: int = Query(500, ge=1, le=5000), who: Principal = viewer) -> list[dict[str, Any]]:
    """Quarantined jobs with their reasons (and objects quarantined before routing)."""
    return svc(request).quarantine(limit)


@router.post("/jobs/{job_id}/retry", tags=["queue"])
def retry_job(request: Request, job_id: RowId, who: Principal = operator) -> dict[str, Any]:
    """Process a quarantined job again (after its cause was fixed)."""
    return svc(request).retry_job(job_id, who, client_host(request))


@router.post("/jobs/{job_id}/discard", tags=["queue"])
def discard_job(request: Request, job_id: RowId, who: Principal = operator) -> dict[str, Any]:
    """Give up on a quarantined job: nothing of it is ever sent."""
    return svc(request).discard_job(job_id, who, client_host(request))


@router.get("/deliveries", tags=["queue"])
def deliveries(request: Request, state: str = Query("FAILED", description="PENDING | SENDING | RETRY_WAIT | SENT | FAILED, or empty for all"),
               destination: str = "", limit: int = Query(500, ge=1, le=5000), who: Principal = viewer) -> list[dict[str, Any]]:
    return svc(request).deliveries(state, destination, limit)


@router.post("/deliveries/retry", tags=["queue"])
def retry_deliveries(request: Request, destination: str = Query("", description="one destination; empty: all"), who: Principal = operator) -> dict[str, int]:
    """Re-queue FAILED (dead-letter) deliveries."""
    return {"requeued": svc(request).retry_deliveries(destination, who, client_host(request))}


@router.get("/destinations", tags=["status"])
def destinations(request: Request, who: Principal = viewer) -> list[dict[str, Any]]:
    """Each destination: address, deliveries per state, last sent, health at the last check."""
    return svc(request).destinations()


@router.get("/routes", tags=["routes"])
def routes(request: Request, who: Principal = viewer) -> list[dict[str, Any]]:
    return svc(request).routes()


@router.post("/routes/explain", tags=["routes"])
async def explain(request: Request, file: UploadFile = File(..., description="one DICOM file"), calling_ae: str = Query("", description="calling AE title to assume"),
                  who: Principal = viewer) -> dict[str, Any]:
    """Which routes this file would take, and why. Nothing is stored or logged."""
    data = await file.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        raise HTTPException(413, f"the file is larger than {MAX_UPLOAD // 2**20} MiB")
    return await run_in_threadpool(svc(request).explain, data, calling_ae)


async def _bounded_body(request: Request, cap: int) -> bytes:
    """The raw request body, held in memory only. Refused past ``cap`` bytes: by its
    Content-Length before anything is read, else while a chunked body is read. Errors
    never quote a header."""
    too_large = HTTPException(413, f"the body is larger than {cap // 2**20} MiB" if cap >= 2**20 else f"the body is larger than {cap} bytes")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise HTTPException(400, "Content-Length must be a number of bytes")
        if int(declared) > cap:
            raise too_large
        data = await request.body()
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise too_large
            chunks.append(chunk)
        data = b"".join(chunks)
    if len(data) > cap:
        raise too_large
    return data


async def _query_body(request: Request, cap: int) -> bytes:
    """The raw request body (one DICOM file), held in memory only (a form upload would
    spool a large file to disk), at most ``cap`` bytes (:func:`_bounded_body`)."""
    if request.headers.get("content-type", "").lower().startswith("multipart/"):
        raise HTTPException(415, "send the DICOM file as the request body (Content-Type: application/dicom), not as a form")
    data = await _bounded_body(request, cap)
    if not data:
        raise HTTPException(422, "the request body is empty: send one DICOM file (Content-Type: application/dicom)")
    return data


@router.post("/similar", tags=["similar cases"],
             openapi_extra={"requestBody": {"required": True, "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                                                          for t in ("application/dicom", "application/octet-stream")}}})
async def similar(request: Request, k: int = Query(5, ge=1, le=MAX_K, description="how many cases"),
                  contrast: bool = Query(False, description="also the k nearest cases whose label differs from the query's"),
                  model: str = Query("", description="the [[models]] entry whose index to search; empty: the one indexed"),
                  who: Principal = viewer) -> dict[str, Any]:
    """The indexed anonymized cases nearest to one DICOM image (the body), as `casemask
    similar --json` prints them: each with its pseudonymous UIDs, label, cosine similarity
    of medical vectors and where to fetch it (a WADO-RS URL for a DICOMweb destination).
    The query is never stored, logged or indexed."""
    data = await _query_body(request, MAX_QUERY)
    return await run_in_threadpool(svc(request).similar, data, k, contrast, model or None)


@router.get("/config", tags=["configuration"])
def get_config(request: Request, who: Principal = viewer) -> dict[str, Any]:
    """The configuration file the node runs on (TOML text), and whether it can be changed
    here. Passwords in URLs (`database_url`) are shown to admins only."""
    return svc(request).config_text(reveal=who.may(Role.ADMIN))


async def _toml_body(request: Request) -> str:
    raw = await _bounded_body(request, MAX_CONFIG)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(422, "the configuration must be UTF-8 TOML text") from None


@router.put("/config", tags=["configuration"],
            openapi_extra={"requestBody": {"required": True, "content": {"application/toml": {"schema": {"type": "string"}}, "text/plain": {"schema": {"type": "string"}}}}})
async def put_config(request: Request, who: Principal = admin) -> dict[str, Any]:
    """Replace the configuration (TOML text as the body). Validated first: an invalid one
    is refused (422) with the problems `casemask config check` reports, and nothing is
    written. Applied at once, as by a reload."""
    text = await _toml_body(request)
    return await run_in_threadpool(svc(request).put_config, text, who, client_host(request))


@router.post("/config/check", tags=["configuration"],
             openapi_extra={"requestBody": {"required": True, "content": {"application/toml": {"schema": {"type": "string"}}}}})
async def check_config(request: Request, who: Principal = admin) -> dict[str, Any]:
    """Validate a configuration without saving it (admins: checking reads the files the
    text names, on the node's machine, and says what it found there)."""
    text = await _toml_body(request)
    s = await run_in_threadpool(svc(request).check_config, text)
    return {"ok": True, "warnings": s.warnings, "sources": len(s.sources), "destinations": len(s.destinations), "routes": len(s.routes), "models": len(s.models)}


@router.post("/config/reload", tags=["configuration"])
def reload_config(request: Request, who: Principal = admin) -> dict[str, Any]:
    """Read the configuration file again and apply it (as SIGHUP does)."""
    return svc(request).reload(who, client_host(request))


def _filter(event: str, actor: str, study_id: int | None, since: dt.datetime | None, until: dt.datetime | None, failures: bool) -> audit.Filter:
    def naive(t: dt.datetime | None) -> dt.datetime | None:
        return t.astimezone(dt.UTC).replace(tzinfo=None) if t and t.tzinfo else t

    return audit.Filter(event=event, actor=actor, study_id=study_id, since=naive(since), until=naive(until), failures_only=failures)


@router.get("/audit", tags=["audit"])
def audit_list(request: Request, event: str = "", actor: str = "", study_id: RowIdQuery = None, since: dt.datetime | None = None,
               until: dt.datetime | None = None, failures: bool = False, limit: int = Query(200, ge=1, le=5000), who: Principal = viewer) -> list[dict[str, Any]]:
    """Audit entries, newest first, filtered by event, actor, study, time (UTC) and outcome."""
    return svc(request).audit(_filter(event, actor, study_id, since, until, failures), limit)


@router.get("/audit/export", tags=["audit"], response_class=Response, responses={200: {"content": {"application/xml": {}}}})
def audit_export(request: Request, event: str = "", actor: str = "", study_id: RowIdQuery = None, since: dt.datetime | None = None,
                 until: dt.datetime | None = None, failures: bool = False, limit: int = Query(5000, ge=1, le=100000), who: Principal = admin) -> Response:
    """The entries as DICOM Audit Messages (PS3.15 A.5 / RFC 3881 XML), oldest first."""
    data = svc(request).audit_export(_filter(event, actor, study_id, since, until, failures), who, client_host(request), limit)
    return Response(data, media_type="application/xml", headers={"Content-Disposition": 'attachment; filename="casemask-audit.xml"'})


@router.post("/mapping/export", tags=["mapping"], response_class=Response, responses={200: {"content": {"application/zip": {}}}})
def mapping_export(request: Request, who: Principal = admin) -> Response:
    """The pseudonym mapping (uids.csv, patients.csv; see `casemask export-mapping`) as a ZIP. Only over HTTPS or on
    a loopback address: it is the key that re-identifies every patient."""
    ctx = context(request)
    if ctx.http.tls is None and ctx.http.host not in ("127.0.0.1", "::1", "localhost"):
        raise HTTPException(403, "the mapping is served only over HTTPS ([http] tls) or on a loopback address")
    data = svc(request).mapping_zip(who, client_host(request))
    return Response(data, media_type="application/zip", headers={"Content-Disposition": 'attachment; filename="casemask-mapping.zip"'})


@router.get("/outputs/{output_id}/preview.png", tags=["studies"], response_class=Response, responses={200: {"content": {"image/png": {}}}})
def preview(request: Request, output_id: RowId, who: Principal = viewer) -> Response:
    """A PNG thumbnail of a de-identified output (there is none of originals)."""
    return Response(svc(request).preview(output_id), media_type="image/png")

"""The dashboard: server-rendered pages (Jinja2) over the same service layer as the API.

Logged in with a session cookie; every form carries the session's CSRF token. The
only script (static/app.js) refreshes the parts of a page marked ``data-refresh``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from node import audit
from node.accounts import digest
from node.db import Role
from node.http import auth
from node.http.auth import MAX_ROW_ID, RowId, UiUser, check_csrf, client_host, context, row_id, ui_role
from node.service import ServiceError

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
router = APIRouter(include_in_schema=False)
viewer = Depends(ui_role(Role.VIEWER))
operator = Depends(ui_role(Role.OPERATOR))
admin = Depends(ui_role(Role.ADMIN))

NAV = [("/", "Overview"), ("/studies", "Studies"), ("/quarantine", "Quarantine"), ("/deliveries", "Failed deliveries"),
       ("/destinations", "Destinations"), ("/routes", "Routes"), ("/audit", "Audit log"), ("/config", "Configuration")]

# What each audit event means, in words, for the audit page's filter and table.
EVENT_LABELS = {
    "association": "DICOM association", "study-received": "Study received", "deidentified": "De-identified",
    "quarantined": "Quarantined", "sent": "Sent to destination", "job-retried": "Job retried", "job-discarded": "Job discarded",
    "deliveries-retried": "Deliveries retried", "config-changed": "Configuration changed", "config-reloaded": "Configuration reloaded",
    "mapping-exported": "Mapping exported", "login": "Login", "logout": "Logout", "account-changed": "Account changed",
    "node-started": "Node started", "node-stopped": "Node stopped", "audit-exported": "Audit log exported",
}


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    return iso.replace("T", " ").removesuffix("Z").split("+")[0][:19] + " UTC"


TEMPLATES.env.filters["bytes"] = _bytes
TEMPLATES.env.filters["when"] = _when
TEMPLATES.env.filters["short_uid"] = lambda u: (u[:14] + "…" + u[-8:]) if u and len(u) > 26 else (u or "-")


def _flashes(request: Request) -> dict[str, list[str]]:
    store = getattr(request.app.state, "flashes", None)
    if store is None:
        store = request.app.state.flashes = {}
    return store


def flash(request: Request, user: UiUser, message: str) -> None:
    store = _flashes(request)
    if len(store) > 1000:
        store.clear()
    store.setdefault(digest(user.cookie), []).append(message)


def render(request: Request, template: str, user: UiUser | None, status_code: int = 200, **ctx: Any) -> HTMLResponse:
    messages = _flashes(request).pop(digest(user.cookie), []) if user else []
    base = {"user": user.principal if user else None, "csrf": user.csrf if user else "", "nav": NAV, "path": request.url.path,
            "messages": messages, "node": context(request).service.settings.node.ae_title, "Role": Role}
    return TEMPLATES.TemplateResponse(request, template, {**base, **ctx}, status_code=status_code)


def error_page(request: Request, status: int, message: str, problems: list[str]) -> HTMLResponse:
    try:
        user = auth.ui_user(request)
    except auth.LoginRequired:
        user = None
    return render(request, "error.html", user, status_code=status, status=status, message=message, problems=problems)


def back(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


# -- login ---------------------------------------------------------------------------------
def _safe_next(target: str) -> str:
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


@router.get("/login")
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    token = auth.new_login_token()
    resp = render(request, "login.html", None, next=_safe_next(next), login_token=token, error="")
    resp.set_cookie(auth.LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=context(request).secure_cookies, path="/login")
    return resp


@router.post("/login")
def login_submit(request: Request, name: str = Form(...), password: str = Form(...), login_token: str = Form(""), next: str = Form("/")) -> Response:
    ctx = context(request)
    cookie_token = request.cookies.get(auth.LOGIN_COOKIE, "")
    if not login_token or not cookie_token or login_token != cookie_token:
        outcome: tuple[str, str] | str = "The login form was out of date. Please try again."
    else:
        outcome = auth.login(ctx, name.strip(), password, client_host(request), request.cookies.get(auth.DEVICE_COOKIE, ""))
    if isinstance(outcome, str):
        token = auth.new_login_token()
        resp = render(request, "login.html", None, status_code=401 if "Wrong" in outcome else 429 if "Too many" in outcome else 503 if outcome == auth.BUSY else 400,
                      next=_safe_next(next), login_token=token, error=outcome, name=name)
        resp.set_cookie(auth.LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=ctx.secure_cookies, path="/login")
        return resp
    cookie, _csrf = outcome
    resp = back(_safe_next(next))
    resp.set_cookie(auth.SESSION_COOKIE, cookie, httponly=True, samesite="strict", secure=ctx.secure_cookies, path="/",
                    max_age=int(ctx.http.session_hours * 3600))
    resp.set_cookie(auth.DEVICE_COOKIE, auth.new_device_cookie(ctx, name.strip()), httponly=True, samesite="strict", secure=ctx.secure_cookies, path="/login",
                    max_age=auth.DEVICE_DAYS * 86400)
    resp.delete_cookie(auth.LOGIN_COOKIE, path="/login")
    return resp


@router.post("/logout")
def logout(request: Request, csrf: str = Form(""), user: UiUser = viewer) -> Response:
    check_csrf(user, csrf)
    auth.logout(context(request), user, client_host(request))
    resp = back("/login")
    resp.delete_cookie(auth.SESSION_COOKIE, path="/")
    return resp


# -- pages -----------------------------------------------------------------------------------
@router.get("/")
def overview(request: Request, user: UiUser = viewer) -> HTMLResponse:
    svc = context(request).service
    status = svc.status()
    counts = status["counts"]
    failed = sum(v.get("FAILED", 0) for k, v in counts.items() if k.startswith("destination:"))
    return render(request, "overview.html", user, status=status, failed=failed, destinations=svc.destinations(),
                  recent=svc.studies(limit=10), ready=svc.ready())


@router.get("/studies")
def studies(request: Request, state: str = "", page: int = Query(1, ge=1, le=MAX_ROW_ID // 50), user: UiUser = viewer) -> HTMLResponse:
    per = 50
    state = state.upper() if state.upper() in ("RECEIVING", "ROUTED", "DONE") else ""
    rows = context(request).service.studies(state, per + 1, (page - 1) * per)
    return render(request, "studies.html", user, studies=rows[:per], state=state, page=page, more=len(rows) > per)


@router.get("/studies/{study_id}")
def study(request: Request, study_id: RowId, user: UiUser = viewer) -> HTMLResponse:
    st = context(request).service.study(study_id)
    return render(request, "study.html", user, study=st, labels=EVENT_LABELS)


@router.get("/quarantine")
def quarantine(request: Request, user: UiUser = viewer) -> HTMLResponse:
    return render(request, "quarantine.html", user, rows=context(request).service.quarantine())


@router.post("/jobs/{job_id}/{action}")
def job_action(request: Request, job_id: RowId, action: str, csrf: str = Form(""), user: UiUser = operator) -> Response:
    """The quarantine page's Retry and Discard buttons."""
    check_csrf(user, csrf)
    svc = context(request).service
    act, done = {"retry": (svc.retry_job, "will be processed again"), "discard": (svc.discard_job, "discarded: nothing of it will be sent")}.get(action, (None, ""))
    if act is None:
        raise HTTPException(404, f"no action {action!r}: retry or discard")
    try:
        act(job_id, user.principal, client_host(request))
        flash(request, user, f"Job {job_id} {done}.")
    except ServiceError as exc:
        flash(request, user, f"Job {job_id}: {exc}")
    return back("/quarantine")


@router.get("/deliveries")
def deliveries(request: Request, destination: str = "", user: UiUser = viewer) -> HTMLResponse:
    svc = context(request).service
    return render(request, "deliveries.html", user, rows=svc.deliveries("FAILED", destination), destination=destination,
                  names=[d.name for d in svc.settings.destinations])


@router.post("/deliveries/retry")
def retry_deliveries(request: Request, destination: str = Form(""), csrf: str = Form(""), next: str = Form("/deliveries"), user: UiUser = operator) -> Response:
    check_csrf(user, csrf)
    try:
        n = context(request).service.retry_deliveries(destination, user.principal, client_host(request))
        flash(request, user, f"{n} failed or waiting deliveries{' to ' + destination if destination else ''} re-queued.")
    except ServiceError as exc:
        flash(request, user, str(exc))
    return back(_safe_next(next))


@router.get("/destinations")
def destinations(request: Request, user: UiUser = viewer) -> HTMLResponse:
    return render(request, "destinations.html", user, rows=context(request).service.destinations())


@router.get("/routes")
def routes(request: Request, user: UiUser = viewer) -> HTMLResponse:
    svc = context(request).service
    return render(request, "routes.html", user, routes=svc.settings.routes, unrouted=svc.settings.node.unrouted, result=None, filename="")


@router.post("/routes/explain")
async def explain(request: Request, file: UploadFile = File(...), calling_ae: str = Form(""), csrf: str = Form(""), user: UiUser = viewer) -> HTMLResponse:
    check_csrf(user, csrf)
    from node.http.api import MAX_UPLOAD

    data = await file.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        raise HTTPException(413, f"the file is larger than {MAX_UPLOAD // 2**20} MiB")
    svc = context(request).service
    result = await run_in_threadpool(svc.explain, data, calling_ae.strip())
    return render(request, "routes.html", user, routes=svc.settings.routes, unrouted=svc.settings.node.unrouted, result=result,
                  filename=Path(file.filename or "upload").name)


def _audit_filter(event: str, actor: str, study_id: str, since: str, until: str, failures: str) -> audit.Filter:
    def day(text: str, end: bool) -> dt.datetime | None:
        try:
            d = dt.datetime.fromisoformat(text) if text else None
        except ValueError:
            return None
        if d is not None and len(text) <= 10 and end:
            d += dt.timedelta(days=1)
        return d

    return audit.Filter(event=event if event in EVENT_LABELS else "", actor=actor.strip(), study_id=row_id(study_id),
                        since=day(since, False), until=day(until, True), failures_only=failures == "1")


@router.get("/audit")
def audit_page(request: Request, event: str = "", actor: str = "", study_id: str = "", since: str = "", until: str = "", failures: str = "",
               user: UiUser = viewer) -> HTMLResponse:
    f = _audit_filter(event, actor, study_id, since, until, failures)
    rows = context(request).service.audit(f, limit=500)
    query = urlencode({k: v for k, v in dict(event=event, actor=actor, study_id=study_id, since=since, until=until, failures=failures).items() if v})
    return render(request, "audit.html", user, rows=rows, labels=EVENT_LABELS, f=dict(event=event, actor=actor, study_id=study_id, since=since, until=until, failures=failures),
                  query=query)


@router.get("/audit/export.xml")
def audit_export(request: Request, event: str = "", actor: str = "", study_id: str = "", since: str = "", until: str = "", failures: str = "",
                 user: UiUser = admin) -> Response:
    data = context(request).service.audit_export(_audit_filter(event, actor, study_id, since, until, failures), user.principal, client_host(request))
    return Response(data, media_type="application/xml", headers={"Content-Disposition": 'attachment; filename="casemask-audit.xml"'})


@router.get("/config")
def config(request: Request, user: UiUser = viewer) -> HTMLResponse:
    cfg = context(request).service.config_text(reveal=user.principal.may(Role.ADMIN))
    return render(request, "config.html", user, cfg=cfg, text=cfg["text"], problems=[], result=None)


@router.post("/config")
def config_submit(request: Request, text: str = Form(...), action: str = Form("check"), csrf: str = Form(""), user: UiUser = admin) -> HTMLResponse:
    check_csrf(user, csrf)
    svc = context(request).service
    cfg = svc.config_text()
    text = text.replace("\r\n", "\n")
    try:
        if action == "save":
            result = svc.put_config(text, user.principal, client_host(request))
            return render(request, "config.html", user, cfg=svc.config_text(), text=text, problems=[], result={"saved": True, **result})
        s = svc.check_config(text)
        return render(request, "config.html", user, cfg=cfg, text=text, problems=[], result={"checked": True, "warnings": s.warnings})
    except ServiceError as exc:
        return render(request, "config.html", user, status_code=exc.status, cfg=cfg, text=text, problems=exc.problems or [str(exc)], result=None)


@router.post("/config/reload")
def config_reload(request: Request, csrf: str = Form(""), user: UiUser = admin) -> Response:
    check_csrf(user, csrf)
    try:
        r = context(request).service.reload(user.principal, client_host(request))
        flash(request, user, "Configuration reloaded: " + (", ".join(r["applied"]) or "nothing changed") + (f"; needs a restart: {', '.join(r['restart_required'])}" if r["restart_required"] else ""))
    except ServiceError as exc:
        flash(request, user, f"Not reloaded: {exc}")
    return back("/config")


@router.get("/previews/{output_id}.png")
def preview(request: Request, output_id: RowId, user: UiUser = viewer) -> Response:
    return Response(context(request).service.preview(output_id), media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

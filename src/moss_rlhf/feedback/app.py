"""The labelling web app: FastAPI, server-rendered Jinja2 pages (autoescaped), a small vanilla script, no build step.

Pages (a session cookie — a random session id, never the annotator's token; HttpOnly, SameSite=Strict, Secure with
``secure_cookies``; logging out ends the session on the server; every form post carries a CSRF token derived from
it; failed sign-ins are rate-limited per client address):

- ``GET /login``, ``POST /login``: sign in with the token from ``moss-rlhf feedback add-annotator``;
- ``GET /label``: the next item — conversation, responses side by side in a randomised (recorded) order, the answer
  controls; ``POST /label/submit``, ``POST /label/undo``;
- ``GET /admin``: progress per annotator and agreement (admin token).

JSON API (``Authorization: Bearer TOKEN``, or the session cookie plus an ``X-CSRF-Token`` header on posts):
``GET /api/next``, ``POST /api/judgements``, ``POST /api/undo``, ``GET /api/progress``, ``GET /api/admin/summary``.

No valid token: 401; an annotator on an admin route: 403; a body over ``max_body_bytes``: 413; a malformed request
(an id out of range, JSON nested too deeply, a NUL character, fields of another task type): 4xx with a message,
never 500. Every store call goes through :class:`moss_rlhf.feedback.store.Store` — the same functions the simulated
annotators use. ``project`` limits the app — labelling and the admin pages — to one project.
"""

from __future__ import annotations

import hmac
import json
import secrets
import string
import threading
import time
import uuid
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from moss_rlhf.feedback.agreement import project_agreement
from moss_rlhf.feedback.relabel import uncertain_items
from moss_rlhf.feedback.store import (MAX_ID, AnnotatorInfo, FeedbackError, InvalidSubmission, ItemView, NotFound,
                                      Store, Submission, check_text)

HERE = Path(__file__).parent
SESSION_COOKIE = "mrf_session"
LOGIN_COOKIE = "mrf_login"
LETTERS = string.ascii_uppercase

SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BadRequest(FeedbackError):
    """The request itself is malformed (not JSON, nested too deeply, an undo body of the wrong shape)."""

    status = 400


class LoginLimiter:
    """At most ``attempts`` failed sign-ins per client address in a sliding ``window`` of seconds. Tokens are 192
    random bits, so this is defence in depth: it keeps a brute-force attempt from costing the server anything."""

    def __init__(self, attempts: int = 10, window: float = 300.0):
        self.attempts, self.window = attempts, window
        self.failures: dict[str, deque] = defaultdict(deque)
        self.lock = threading.Lock()

    def _recent(self, client: str) -> deque:
        times = self.failures[client]
        while times and times[0] < time.monotonic() - self.window:
            times.popleft()
        return times

    def retry_after(self, client: str) -> int:
        """Seconds until the client may try again (0: now)."""
        with self.lock:
            times = self._recent(client)
            if not times:
                del self.failures[client]  # forget addresses with no recent failure: the table stays small
            return int(times[0] + self.window - time.monotonic()) + 1 if len(times) >= self.attempts else 0

    def failed(self, client: str) -> None:
        with self.lock:
            self._recent(client).append(time.monotonic())


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (by Content-Length or as it streams in) gets 413 before
    the app reads it; security headers on every response."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                return await _plain(send_with_headers, 400, "bad Content-Length")
            if too_big:
                return await _plain(send_with_headers, 413, f"request body over {self.max_bytes} bytes")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send_with_headers)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _plain(send_with_headers, 413, f"request body over {self.max_bytes} bytes")
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send_with_headers)


async def _plain(send, status: int, text: str) -> None:
    body = json.dumps({"error": text}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(store: Store, project: str | int | None = None, max_body_bytes: int = 64 * 1024,
               secure_cookies: bool = False, login_attempts: int = 10) -> FastAPI:
    """The labelling app over ``store``; ``project`` limits it to one project (name or id)."""
    project_id = store.require_project(project)
    limiter = LoginLimiter(login_attempts)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    app = FastAPI(title="moss-rlhf feedback", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.store = store

    def csrf_for(token: str) -> str:
        """The session's CSRF token: derived from the session token (which a cross-site page cannot read), so it
        survives restarts and works across server processes, and does not reveal the session token."""
        return hmac.new(token.encode(), b"moss-rlhf feedback csrf", "sha256").hexdigest()

    def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**context), status_code=status)

    def bearer(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else None

    async def who(request: Request, admin: bool = False, csrf: str | None = None) -> tuple[AnnotatorInfo, str]:
        """The signed-in annotator; for cookie sessions on posts, ``csrf`` must match."""
        token = bearer(request)
        via_cookie = token is None
        if via_cookie:
            token = request.cookies.get(SESSION_COOKIE)
        check = store.session_annotator if via_cookie else store.authenticate
        annotator = await run_in_threadpool(check, token) if token else None
        if annotator is None:
            raise AuthError(401, "sign in with your annotator token")
        if admin and not annotator.is_admin:
            raise AuthError(403, "this page needs an admin token")
        if via_cookie and request.method == "POST":
            given = csrf if csrf is not None else request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(given.encode(), csrf_for(token).encode()):
                raise AuthError(403, "the form expired (CSRF check failed): reload the page")
        return annotator, token

    def is_api(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    def login_page(request: Request, status: int, error: str = "") -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        response = render("login.html", status, error=error, login_nonce=nonce, user=None)
        response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict", secure=secure_cookies,
                            max_age=3600)
        return response

    @app.exception_handler(AuthError)
    async def _auth_error(request: Request, exc: AuthError):
        if is_api(request):
            return JSONResponse({"error": exc.message}, status_code=exc.status,
                                headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
        if exc.status == 401:
            return login_page(request, 401, exc.message if request.cookies.get(SESSION_COOKIE) else "")
        return render("message.html", exc.status, title="Not allowed", message=exc.message, user=None)

    @app.exception_handler(FeedbackError)
    async def _feedback_error(request: Request, exc: FeedbackError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    def item_param(item: int | None) -> int | None:
        if item is not None and not 0 <= item <= MAX_ID:
            raise InvalidSubmission(f"item: out of range (0..{MAX_ID})")
        return item

    def project_param(name: str | None) -> str | int | None:
        """The admin pages' ``?project=``: any project, unless the app serves only one."""
        if name is not None:
            check_text(name, "project")
        if project_id is not None:
            if name not in (None, "") and store.project_id(name) != project_id:
                raise NotFound("this server serves one project only")
            return project_id
        return name

    async def json_body(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("body is not valid JSON") from None
        except RecursionError:
            raise BadRequest("body is JSON nested too deeply") from None

    # ------------------------------------------------------------------------------------------------ pages

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.get("/")
    async def index(request: Request):
        return RedirectResponse("/label", status_code=303)

    @app.get("/login")
    async def login_form(request: Request):
        return login_page(request, 200)

    @app.post("/login")
    async def login(request: Request):
        client = request.client.host if request.client else "?"
        wait = limiter.retry_after(client)
        if wait:
            response = login_page(request, 429, f"Too many failed sign-ins; try again in {wait} s.")
            response.headers["Retry-After"] = str(wait)
            return response
        form = await request.form()
        nonce = str(form.get("login_nonce", ""))
        if not nonce or not hmac.compare_digest(nonce.encode(), request.cookies.get(LOGIN_COOKIE, "").encode()):
            return login_page(request, 403, "The sign-in form expired; please try again.")
        token = str(form.get("token", "")).strip()
        annotator = await run_in_threadpool(store.authenticate, token) if token else None
        if annotator is None:
            limiter.failed(client)
            return login_page(request, 401, "That token is not valid.")
        session = await run_in_threadpool(store.open_session, annotator.id)
        response = RedirectResponse("/admin" if annotator.is_admin else "/label", status_code=303)
        response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict", secure=secure_cookies,
                            max_age=12 * 3600, path="/")
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    async def logout(request: Request):
        form = await request.form()
        _, token = await who(request, csrf=str(form.get("csrf", "")))
        if request.cookies.get(SESSION_COOKIE) == token:
            await run_in_threadpool(store.close_session, token)  # the session ends on the server, not just here
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def label_context(annotator: AnnotatorInfo, token: str, item: ItemView | None, progress, error: str = ""):
        cards = []
        if item is not None:
            for n, c in enumerate(item.candidates):
                cards.append({"id": c.id, "letter": LETTERS[n % 26], "key": str(n + 1), "text": c.text})
        return dict(user=annotator, csrf=csrf_for(token), item=item, cards=cards, progress=progress, error=error,
                    submission_id=str(uuid.uuid4()), shown_order=",".join(str(c["id"]) for c in cards),
                    ratings=list(range(1, 8)))

    @app.get("/label")
    async def label_page(request: Request, item: int | None = None):
        annotator, token = await who(request)
        view = await run_in_threadpool(store.next_item, annotator.id, project_id, item_param(item))
        progress = await run_in_threadpool(store.progress, annotator.id, project_id)
        return render("label.html", **label_context(annotator, token, view, progress))

    @app.post("/label/submit")
    async def label_submit(request: Request):
        form = await request.form()
        annotator, token = await who(request, csrf=str(form.get("csrf", "")))
        try:
            sub = _submission_from_form(form)
            await run_in_threadpool(store.submit, annotator.id, sub)
        except FeedbackError as e:
            item_id = _int(form.get("item_id"))
            item_id = item_id if item_id is not None and 0 <= item_id <= MAX_ID else None
            view = await run_in_threadpool(store.next_item, annotator.id, project_id, item_id)
            progress = await run_in_threadpool(store.progress, annotator.id, project_id)
            return render("label.html", e.status, **label_context(annotator, token, view, progress, str(e)))
        return RedirectResponse("/label", status_code=303)

    @app.post("/label/undo")
    async def label_undo(request: Request):
        form = await request.form()
        annotator, _ = await who(request, csrf=str(form.get("csrf", "")))
        undone = await run_in_threadpool(store.retract, annotator.id)
        return RedirectResponse(f"/label?item={undone.item_id}" if undone else "/label", status_code=303)

    @app.get("/admin")
    async def admin_page(request: Request, project: str | None = None):
        annotator, token = await who(request, admin=True)
        summary = await run_in_threadpool(_summary, store, project_param(project), project_id)
        return render("admin.html", user=annotator, csrf=csrf_for(token), **summary)

    # ------------------------------------------------------------------------------------------------ JSON API

    @app.get("/api/next")
    async def api_next(request: Request, item: int | None = None):
        annotator, _ = await who(request)
        view = await run_in_threadpool(store.next_item, annotator.id, project_id, item_param(item))
        progress = await run_in_threadpool(store.progress, annotator.id, project_id)
        body: dict[str, Any] = {"item": None, "progress": {"done": progress.done, "total": progress.total}}
        if view is not None:
            body["item"] = {"id": view.id, "project": view.project, "task_type": view.task_type,
                            "messages": view.messages, "guideline_version": view.guideline_version,
                            "shown_order": view.shown_order,
                            "candidates": [{"id": c.id, "label": LETTERS[n % 26], "text": c.text}
                                           for n, c in enumerate(view.candidates)]}
            body["submission_id"] = str(uuid.uuid4())
        return body

    @app.post("/api/judgements")
    async def api_submit(request: Request):
        annotator, _ = await who(request)
        sub = Submission.from_json(await json_body(request))
        result = await run_in_threadpool(store.submit, annotator.id, sub)
        return JSONResponse({"created": result.created, "judgement": result.judgement.to_json()},
                            status_code=201 if result.created else 200)

    @app.post("/api/undo")
    async def api_undo(request: Request):
        """No body (or ``{}``): undo the latest judgement; ``{"judgement_id": N}``: that one. Anything else is
        refused — a malformed request must never undo the wrong judgement."""
        annotator, _ = await who(request)
        judgement_id = None
        if (await request.body()).strip():
            if not request.headers.get("content-type", "").startswith("application/json"):
                raise BadRequest("send the undo as JSON ({\"judgement_id\": N}) or with no body")
            data = await json_body(request)
            if not isinstance(data, dict) or set(data) - {"judgement_id"}:
                raise BadRequest("expected {} or {\"judgement_id\": N}")
            if "judgement_id" in data:
                value = data["judgement_id"]
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
                    raise BadRequest("judgement_id: expected a judgement id (an integer)")
                judgement_id = value
        undone = await run_in_threadpool(store.retract, annotator.id, judgement_id)
        return {"retracted": undone.to_json() if undone else None}

    @app.get("/api/progress")
    async def api_progress(request: Request):
        annotator, _ = await who(request)
        progress = await run_in_threadpool(store.progress, annotator.id, project_id)
        return {"done": progress.done, "total": progress.total, "remaining": progress.remaining}

    @app.get("/api/admin/summary")
    async def api_admin_summary(request: Request, project: str | None = None):
        await who(request, admin=True)
        summary = await run_in_threadpool(_summary, store, project_param(project), project_id)
        return {"project": summary["project"], "projects": summary["projects"],
                "annotators": summary["annotators"], "agreement": summary["agreement"].to_json()}

    return app


def _int(value) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _submission_from_form(form) -> Submission:
    """A :class:`Submission` from the labelling form's fields (see templates/label.html)."""
    item_id = _int(form.get("item_id"))
    if item_id is None:
        raise InvalidSubmission("item_id: missing")
    shown = [_int(v) for v in str(form.get("shown_order", "")).split(",") if v.strip()]
    if any(v is None for v in shown):
        raise InvalidSubmission("shown_order: expected candidate ids")
    ratings, ranks = {}, {}
    for key, value in form.multi_items():
        value = str(value).strip()
        if key.startswith("rating_") and value:
            cid, score = _int(key[7:]), _int(value)
            if cid is None or score is None:
                raise InvalidSubmission(f"{key}: expected a number 1..7")
            ratings[cid] = score
        elif key.startswith("rank_") and value:
            cid, rank = _int(key[5:]), _int(value)
            if cid is None or rank is None or rank < 1:
                raise InvalidSubmission(f"{key}: expected a rank 1, 2, ...")
            ranks[cid] = rank
    if len(set(ranks.values())) != len(ranks):
        raise InvalidSubmission("ranking: two responses share a rank")
    time_ms = _int(form.get("time_ms"))
    return Submission(
        item_id=item_id, submission_id=str(form.get("submission_id", "")) or str(uuid.uuid4()),
        choice=str(form.get("choice", "")) or None, strength=str(form.get("strength", "")) or None,
        ratings=ratings or None, ranking=[cid for cid, _ in sorted(ranks.items(), key=lambda kv: kv[1])] or None,
        rationale=str(form.get("rationale", "")).strip(), edited=str(form.get("edited", "")).strip(),
        shown_order=shown or None, time_ms=time_ms if time_ms is not None and time_ms >= 0 else None,
        guideline_version=str(form.get("guideline_version", "")) or None)


def _summary(store: Store, project: str | int | None, only: int | None = None) -> dict:
    """What the admin page shows: per-annotator progress and the agreement report, for one project (of the one
    project ``only`` when the app serves one)."""
    projects = [p for p in store.projects() if only is None or p["id"] == only]
    project_id = store.project_id(project)
    if project_id is None and projects:
        project_id = projects[0]["id"]
    current = next((p for p in projects if p["id"] == project_id), None)
    items = store.items(project_id) if project_id is not None else []
    judgements = store.judgements(project_id) if project_id is not None else []
    report = project_agreement(items, judgements)
    rows = []
    for a in store.annotator_progress(project_id):
        progress = store.progress(a.annotator_id, project_id)
        consensus = report.consensus.get(a.name)
        gold = report.gold.get(a.name)
        rows.append({"name": a.name, "is_admin": a.is_admin, "judged": a.judged, "assigned": a.assigned,
                     "retracted": a.retracted, "total": progress.total,
                     "median_time_s": None if a.median_time_ms is None else a.median_time_ms / 1000,
                     "consensus": None if consensus is None or not consensus.total else
                     {"rate": consensus.rate, "agree": consensus.agree, "total": consensus.total},
                     "gold": None if gold is None or not gold.total else
                     {"rate": gold.rate, "agree": gold.agree, "total": gold.total},
                     "last_active": (a.last_active or "")[:19].replace("T", " ")})
    needed = current["annotators_per_item"] if current else 0
    per_item: dict[int, int] = {}
    for j in judgements:
        per_item[j.item_id] = per_item.get(j.item_id, 0) + 1
    complete = sum(1 for i in items if per_item.get(i.id, 0) >= needed) if needed else 0
    return {"project": current, "projects": projects, "annotators": rows, "agreement": report,
            "complete_items": complete, "gold_items": sum(1 for i in items if i.gold is not None),
            "uncertain": uncertain_items(items, judgements)}


def serve(store: Store, host: str = "127.0.0.1", port: int = 8000, project: str | int | None = None,
          max_body_bytes: int = 64 * 1024, secure_cookies: bool = False) -> None:
    import uvicorn

    app = create_app(store, project, max_body_bytes, secure_cookies)
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False, server_header=False)


"""HTTP of the reward app (under its route prefix, e.g. /reward): scoring, feedback, the review page.

    GET  /healthz                 {"ok": true}; the only route without the token
    POST /score                   {"prompts": [...], "responses": [...], "references"?: [...]} -> rewards and parts
    POST /feedback                {"records": [{prompt, response, score}]} -> stored
    GET  /review                  the review page (HTML; ?token=T once sets a cookie, then redirects)
    GET  /review/app.js|style.css the page's script and style
    GET  /samples?step=&prompt=&limit=   the latest samples, newest first
    GET  /curves                  per-step reward, gold, KL, eval, reward model version
    GET  /ratings                 rating counts and the reward model version now scoring
    POST /rate                    one rating, or {"ratings": [...]} (see ratings.py)

Every route but /healthz needs the app's token: `Authorization: Bearer T`, or the HttpOnly,
SameSite=Strict cookie that opening /review?token=T sets (what a browser has). A POST
authenticated by the cookie must be `Content-Type: application/json`, which a cross-site form
cannot send without a CORS preflight this app never grants. Bad input is a 4xx with one line of
JSON, {"error": ...}. The page is static files; sample text reaches it only as JSON and is put
into the page with textContent, and the Content-Security-Policy allows only the app's own script.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from contract.datasets import DatasetError
from reward_service.ratings import validate_rating
from reward_service.review import parse_query

PAGE_DIR = Path(__file__).parent / "review_page"
STATIC = {"review": ("index.html", "text/html; charset=utf-8"),
          "review/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "review/style.css": ("style.css", "text/css; charset=utf-8")}
COOKIE = "rlhf_review_token"
MAX_BODY = 8 << 20
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
           "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                      "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"}


def error(msg: str, status: int) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(msg).split())[:500]}, status_code=status, headers=HEADERS)


def ok(body) -> JSONResponse:
    return JSONResponse(body, headers=HEADERS)


class Auth:
    def __init__(self, token_sha256: str | None):
        self.sha = token_sha256

    def _good(self, token: str | None) -> bool:
        if self.sha is None:
            return True
        if not token:
            return False
        return hmac.compare_digest(hashlib.sha256(token.strip().encode()).hexdigest(), self.sha)

    def check(self, request: Request) -> str | None:
        """'header' or 'cookie' for an authorized request, None otherwise."""
        if self.sha is None:
            return "open"
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._good(token):
            return "header"
        if self._good(request.cookies.get(COOKIE)):
            return "cookie"
        return None


def denied(root: str) -> JSONResponse:
    return error(f"missing or wrong token: send 'Authorization: Bearer TOKEN', or open {root}/review?token=TOKEN "
                 f"once in the browser", 401)


async def read_json(request: Request):
    body = await request.body()
    if len(body) > MAX_BODY:
        raise DatasetError(f"body is larger than {MAX_BODY >> 20} MiB")
    try:
        return json.loads(body)
    except ValueError as e:
        raise DatasetError(f"body is not valid JSON ({e})") from None


def page_file(route: str) -> Response:
    name, media = STATIC[route]
    return Response((PAGE_DIR / name).read_bytes(), media_type=media, headers=HEADERS)


async def handle(scorer, request: Request) -> Response:
    """Dispatch one HTTP request of the reward app (`scorer` is the RewardScorer replica)."""
    root = request.scope.get("root_path", "").rstrip("/")
    route = request.url.path[len(root):].strip("/") if request.url.path.startswith(root) else ""
    method = request.method
    if method == "GET" and route == "healthz":
        return ok({"ok": True})
    how = scorer.auth.check(request)
    if method == "GET" and route == "review" and "token" in request.query_params:
        if not scorer.auth._good(request.query_params["token"]):
            return denied(root)
        resp = RedirectResponse(f"{root}/review", status_code=303, headers=HEADERS)
        resp.set_cookie(COOKIE, request.query_params["token"], path=root or "/", httponly=True, samesite="strict")
        return resp
    if how is None:
        return denied(root)
    try:
        if method == "GET" and route in STATIC:
            return page_file(route)
        if method == "GET" and route == "samples":
            return ok(await scorer.feedback.samples.remote(parse_query(dict(request.query_params))))
        if method == "GET" and route == "curves":
            return ok(await scorer.feedback.curves.remote())
        if method == "GET" and route == "ratings":
            return ok(await scorer.feedback.summary.remote())
        if method != "POST" or route not in ("score", "feedback", "rate"):
            return error(f"unknown endpoint {method} {request.url.path}", 404)
        if how == "cookie" and request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error("a POST signed in by cookie must have Content-Type: application/json", 415)
        body = await read_json(request)
        if route == "rate":
            batch = body.get("ratings") if isinstance(body, dict) and "ratings" in body else [body]
            if not isinstance(batch, list) or not batch:
                raise DatasetError("rate: 'ratings' must be a non-empty list of ratings")
            for i, r in enumerate(batch):  # all valid, or nothing stored
                validate_rating(r, f"rate[{i}]" if len(batch) > 1 else "rate")
            return ok(await scorer.feedback.rate.remote(batch))
        if route == "feedback":
            return ok(await scorer.add_feedback(body))
        if not isinstance(body, dict):
            raise DatasetError("score: expected an object {\"prompts\": [...], \"responses\": [...]}")
        return ok(wire_to_json(await scorer.score(body.get("prompts"), body.get("responses"), body.get("messages"),
                                                 body.get("references"))))
    except (ValueError, DatasetError) as e:
        return error(e, 400)


def wire_to_json(out: dict) -> dict:
    """NaN is not JSON: non-finite parts go out as null."""
    import numpy as np

    def clean(a):
        return [float(v) if np.isfinite(v) else None for v in a]
    return {"reward": out["reward"].tolist(), "valid": out["valid"].tolist(),
            "parts": {k: clean(v) for k, v in out["parts"].items()}, "errors": out["errors"],
            "reward_model_version": out["rm_version"].tolist(),
            **({"verifier": out["verifier"], "verifier_outcome": out["verifier_outcome"]} if "verifier" in out else {})}

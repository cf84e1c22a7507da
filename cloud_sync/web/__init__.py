"""`cloud-sync web`: the fleet page a workshop lives in — the fleet, its alerts, a page per vehicle and per alert
(the signals the model saw, plotted with uPlot), verdicts and breakdowns, model quality, live without reloading, and
the maintenance assistant's chat panel beside every page.

Starlette served by uvicorn (docs/cloud_sync.md, "The fleet page"):

    guard.py    Host check (DNS rebinding), Origin check on changes (CSRF), strict CSP and headers on every answer
    app.py      routes, Jinja2 templates (templates/), static files (static/: our JS and CSS, vendored uPlot),
                POST checks, the sign-in gate, the live stream (server-sent events)
    api.py      the JSON each endpoint answers, from the database (no HTTP)
    chat.py     the assistant's chat panel behind POST /api/ask: the question's checks, the knowledge base opened
                once and refreshed, at most MAX_ASKING questions at once (no HTTP)
    signin.py   password hashing (scrypt), sessions, the rate limit on failed sign-ins
    server.py   the socket, uvicorn, `make_server`

Everything from the database came from vehicles (or people typing) and is treated as hostile: JSON carries it with
markup characters escaped, templates autoescape, the page's scripts insert it with `textContent`, never as HTML, and
the Content-Security-Policy allows no inline script or style at all.
"""

from cloud_sync.web.api import Api, BadRequest, post_fields
from cloud_sync.web.app import MAX_POST_BYTES
from cloud_sync.web.guard import CSP, accepted_hosts, same_origin
from cloud_sync.web.server import SignInError, WebServer, make_server

__all__ = ["CSP", "MAX_POST_BYTES", "Api", "BadRequest", "SignInError", "WebServer", "accepted_hosts", "make_server",
           "post_fields", "same_origin"]

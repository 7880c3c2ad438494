"""The API's interactive documentation (Swagger UI at ``/docs``), served from this process.

FastAPI's own page loads Swagger UI from a CDN and starts it with an inline script: the first
needs the internet, the second the Content-Security-Policy refuses (``script-src 'self'``, no
inline script anywhere). So the page here is static HTML whose scripts are all files of this
origin: Swagger UI 5's bundle and stylesheet from the ``fastapi-offline`` package (kept for
exactly this, FastAPI's docs without a CDN; its own page is not used, as it starts Swagger UI
with an inline script), and a small start script of our own below. The CSP stays as strict as
for the dashboard. Only the three files the page needs are served, by name.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Final

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, HTMLResponse, Response

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

_ASSETS: Final = Path(str(files("fastapi_offline") / "static"))
_FILES: Final = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon.png": "image/png",
}

_PAGE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Community warning gateway — operator API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/assets/favicon.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/start.js"></script>
</body>
</html>
"""

# Swagger UI on this API's document. "Authorize" takes a token from POST /api/v1/auth/token and
# sends it as a bearer header; nothing is kept once the tab is closed.
_START: Final = """window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: false,
  tryItOutEnabled: false,
});
"""


@router.get("/docs", response_class=HTMLResponse)
def docs_page() -> HTMLResponse:
    return HTMLResponse(_PAGE, headers={"Cache-Control": "no-cache"})


@router.get("/docs/start.js")
def docs_start() -> Response:
    return Response(_START, media_type="text/javascript")


@router.get("/docs/assets/{name}")
def docs_asset(name: str) -> FileResponse:
    media = _FILES.get(name)
    if media is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such documentation file")
    return FileResponse(
        _ASSETS / name, media_type=media, headers={"Cache-Control": "max-age=86400"}
    )

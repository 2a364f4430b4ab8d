"""/docs (Swagger UI) and /redoc with --enable-docs, their JavaScript and CSS served by this server.

FastAPI's own pages load Swagger UI and ReDoc from a CDN: a browser opening them runs scripts from outside.
These pages load only same-origin files, the copies that the fastapi-offline package ships:

    /docs ─▶ /docs/swagger-ui-bundle.js, /docs/swagger-ui.css, /docs/favicon.png ─▶ /openapi.json
    /redoc ─▶ /redoc/redoc.standalone.js, /docs/favicon.png                      ─▶ /openapi.json
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

ASSETS = {  # path served -> file of fastapi_offline/static
    "/docs/swagger-ui-bundle.js": "swagger-ui-bundle.js",
    "/docs/swagger-ui.css": "swagger-ui.css",
    "/docs/favicon.png": "favicon.png",
    "/redoc/redoc.standalone.js": "redoc.standalone.js",
}
ASSET_MAX_AGE_SECONDS = 86400
# validatorUrl null: Swagger UI would otherwise show a badge image fetched from an outside validator
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}


def assets_dir() -> Path:
    """Where the fastapi-offline package keeps its copies of Swagger UI and ReDoc."""
    return Path(str(resources.files("fastapi_offline") / "static"))


def install_docs(app: FastAPI) -> tuple[str, ...]:
    """Serve /docs, /redoc and their assets from this server.

    Returns:
        The paths served (open without an API key: a browser cannot send one to a page).
    """
    directory = assets_dir()
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{title} - Swagger UI",
                                   swagger_js_url="/docs/swagger-ui-bundle.js", swagger_css_url="/docs/swagger-ui.css",
                                   swagger_favicon_url="/docs/favicon.png", swagger_ui_parameters=SWAGGER_UI_PARAMETERS)

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{title} - ReDoc",
                              redoc_js_url="/redoc/redoc.standalone.js", redoc_favicon_url="/docs/favicon.png",
                              with_google_fonts=False)

    for path, name in ASSETS.items():
        app.add_api_route(path, _asset_route(directory / name), methods=["GET"], include_in_schema=False)
    return ("/docs", "/redoc", *ASSETS)


def _asset_route(file: Path) -> Callable[[], Awaitable[FileResponse]]:
    async def asset() -> FileResponse:
        return FileResponse(file, headers={"Cache-Control": f"public, max-age={ASSET_MAX_AGE_SECONDS}"})

    return asset

"""python -m handtrace.control.api: serve the API with uvicorn (also `handtrace api run`)."""

from __future__ import annotations

from handtrace.core.settings import Settings, load_settings


def serve(settings: Settings) -> None:
    """Run the API on settings.api.host:port until interrupted."""
    import uvicorn

    from handtrace.control.api.app import create_app

    uvicorn.run(create_app(settings), host=settings.api.host, port=settings.api.port, log_level="info",
                proxy_headers=False)


if __name__ == "__main__":
    serve(load_settings())

"""The application factory: settings in, a wired aiohttp application out, no I/O."""

from __future__ import annotations

from aiohttp import web

from .config import SETTINGS, Settings
from .db import database_context
from .docs import add_docs
from .errors import problem_middleware
from .jobs import jobs_context
from .providers import provider_context
from .routes import add_routes
from .storage import IMAGES, ImageStore
from .workers import begin_stopping_workers, workers_context


def create_app(settings: Settings) -> web.Application:
    """Build the app; its resources open on startup and close in reverse order on cleanup."""
    app = web.Application(middlewares=[problem_middleware], client_max_size=64 * 1024)
    app[SETTINGS] = settings
    app[IMAGES] = ImageStore(settings.storage.data_dir)
    # Order matters: each context needs the ones before it, and they unwind in reverse,
    # so the workers stop before the provider closes and the database closes last.
    app.cleanup_ctx.append(database_context(settings.database_path))
    app.cleanup_ctx.append(jobs_context)
    app.cleanup_ctx.append(provider_context)
    app.cleanup_ctx.append(workers_context)
    app.on_shutdown.append(begin_stopping_workers)
    add_routes(app)
    add_docs(app)
    return app

"""The HTTP API: handlers, event streams, rendering, problem+json, OpenAPI documents and the page."""

"""The operator's HTTP server: JSON API (/api/v1), dashboard pages, /metrics, health.

Built on FastAPI (Starlette) and served by uvicorn in a thread of the node
(:mod:`node.http.server`). Every handler calls :class:`node.service.Service`; none
touches the database itself.
"""

"""gatewise: a resilient HTTP/1.1 reverse proxy that says why a request failed."""

from proxy import compiled as _compiled  # noqa: F401  (first: GATEWISE_PURE, see there)

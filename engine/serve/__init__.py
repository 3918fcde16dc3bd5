"""Serving: an HTTP video API over the engine (``python -m engine.serve``; docs/serving.md).

- :mod:`engine.serve.store`: the job store (SQLite in WAL mode, atomic video files, recovery, expiry);
- :mod:`engine.serve.params`: an API request's fields -> the engine's checked request;
- :mod:`engine.serve.worker`: one engine worker per device, batching compatible jobs into one pipeline call;
- :mod:`engine.serve.app`: the FastAPI app (OpenAI-style video jobs, health, metrics, the page);
- :mod:`engine.serve.metrics`: its Prometheus metrics.

FastAPI, uvicorn, prometheus-client and python-multipart come with the ``serve`` extra
(``pip install -e ".[serve]"``); nothing else in the engine imports this package.
"""

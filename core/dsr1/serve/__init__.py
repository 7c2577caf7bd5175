"""``dsr1 serve``: an OpenAI-compatible HTTP server over the engine loop.

:mod:`.app` (routes, auth, errors), :mod:`.generation` (the two generating routes),
:mod:`.openai_schema` (request bodies → ``SamplingParams``), :mod:`.responses` (response
bodies and SSE chunks), :mod:`.metrics` (Prometheus), :mod:`.state` (loading, in-flight
requests, draining) and :mod:`.server` (uvicorn with SIGTERM → drain). Needs the ``serve``
extra (``pip install 'dsr1[serve]'``); importing this package alone imports none of it.
"""

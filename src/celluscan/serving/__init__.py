"""celluscan.serving: the offline web app and REST API (`celluscan serve`).

Modules: ``app`` (FastAPI app factory, Gradio mounted at ``/``), ``api`` (routes under
``/api/v1``), ``ui`` (Gradio Blocks), ``service`` (the model behind both: batching, time
limits, admission control), ``uploads`` (file names and in-memory zip expansion),
``limits`` (``ServingLimits``), ``middleware`` (security headers, body-size limit),
``knowledge`` + ``knowledge.yaml`` (cell knowledge cards and flag rules), ``differential``
(smear counts and flags), ``report`` (CSV/table views), ``cli`` (the ``serve`` command).
"""

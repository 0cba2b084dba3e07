"""``python -m poolserve_adapter``: run the HTTP adapter against a running Triton (settings from ADAPTER_* env)."""

import os

import uvicorn

from poolserve_adapter.admission_board import prepare_board_dir
from poolserve_adapter.connections import server_options
from poolserve_adapter.lifecycle import LAUNCHER_PID_ENV
from poolserve_adapter.log_config import uvicorn_log_config
from poolserve_adapter.metrics import prepare_multiprocess_dir
from poolserve_adapter.settings import get_settings

if __name__ == "__main__":
    settings = get_settings()
    # Read by the tokenizers library when its thread pool starts, in each worker process.
    if settings.tokenizer_threads:
        os.environ.setdefault("RAYON_NUM_THREADS", str(settings.tokenizer_threads))
    workers = settings.worker_count()
    prepare_multiprocess_dir(workers)  # several workers: /metrics sums them through a shared folder
    prepare_board_dir(workers)  # and admission judges each model by all workers' work
    if workers > 1:  # the workers stop when this launcher dies, however it dies
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    else:
        os.environ.pop(LAUNCHER_PID_ENV, None)
    # A factory, so each of `workers` processes builds its own app (and Triton client) from the env.
    uvicorn.run("poolserve_adapter.app:create_app", factory=True, host=settings.host, port=settings.port,
                workers=workers, log_level="info", log_config=uvicorn_log_config(settings.log_format),
                **server_options(settings))  # connection limits; the open-file limit raised for the workers too

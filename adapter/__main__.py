"""``python -m adapter``: run the HTTP adapter against a running Triton (settings from ADAPTER_* env)."""

import uvicorn

from adapter.app import create_app
from adapter.settings import get_settings

if __name__ == "__main__":
    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")

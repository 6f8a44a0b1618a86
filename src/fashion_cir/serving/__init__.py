"""The search service: a FastAPI app over a catalog index and its web page. FastAPI and uvicorn
are optional (``pip install fashion-cir[serve]``) and imported only by ``serving.app``."""

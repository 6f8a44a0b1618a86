"""The search service (:mod:`.service`: the operations, no web framework) and its FastAPI app with the
web page (:mod:`.app`). FastAPI and uvicorn are optional (``pip install fashion-cir[serve]``) and
imported only by ``serving.app``."""

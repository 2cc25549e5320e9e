"""Serving: a web page to try single images by hand (`vlmtune webui`, Gradio) and an OpenAI-compatible
HTTP API (`vlmtune api`, FastAPI + uvicorn). Both load the model once at start-up and share
:mod:`vlmtune.serve.common` (model + lock, image decoding, label scoring or generation per request)."""

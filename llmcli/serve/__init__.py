"""`llmcli serve`: an OpenAI-compatible HTTP server with continuous batching and streaming.

protocol.py (the wire format: bodies, errors, response JSON and stream chunks), chat.py (chat
templates), engine_loop.py (the thread that owns the model), app.py (the ASGI app and its routes),
server.py (checkpoint to running uvicorn server: the command).
"""

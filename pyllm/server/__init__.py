"""`pyllm serve`: an OpenAI-compatible HTTP server over the continuous batch (app.py; request and response
shapes in openai_api.py)."""

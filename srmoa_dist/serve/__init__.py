"""The HTTP layer: OpenAI-compatible schemas and errors, the Ray Serve app (`app.build_app`), the engine
of one model replica, and helpers to run the app from Python (`local`) and the demo."""

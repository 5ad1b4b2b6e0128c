"""QTG Explorer's web app (Gradio): a thin layer over the ``qtg`` library, which never imports it.

    qtg app [--model nano] [--port 7860] [--host 127.0.0.1] [--device auto]
    python -m app ...                    # the same
    from app.server import build_app, launch
"""

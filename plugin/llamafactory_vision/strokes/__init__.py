"""MagicQuill Draw&Guess: the ``stroke_guess`` dataset format, its rendering, template and plugin."""

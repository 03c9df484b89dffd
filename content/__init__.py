"""The lessons and the Lab's question set, installed as the package ``tutor.lessons``.

Only data lives here; the build maps this folder into the wheel (``pyproject.toml``) so an
installed app finds its lessons with ``importlib.resources``, wherever it was installed.
"""

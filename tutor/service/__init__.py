"""The engine process: the model, the lesson index and the Lab's measurements behind an
OpenAI-shaped HTTP protocol (server), one job at a time (host). The app reaches it through
:mod:`tutor.engine.client`."""

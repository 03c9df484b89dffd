"""Text shown literally: never parsed as markup, with escapes and controls removed."""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Static

from tutor.text import clean


def literal(*parts: str | tuple[str, str]) -> Content:
    """Content from plain strings and (text, style) pairs; the text is cleaned, never parsed."""
    return Content.assemble(*[(clean(p[0]), p[1]) if isinstance(p, tuple) else clean(p) for p in parts])


class Plain(Static):
    """A Static whose text is taken literally."""

    def __init__(self, text: str | Content = "", **kwargs: object) -> None:
        super().__init__(self._safe(text), markup=False, **kwargs)  # type: ignore[arg-type]

    @staticmethod
    def _safe(text: str | Content) -> str | Content:
        return text if isinstance(text, Content) else clean(text)

    def show(self, text: str | Content) -> None:
        # A layout pass walks the whole screen; a streamed reply changes its height only when a
        # line wraps, so the other updates repaint this widget alone. A widget as wide as its
        # text (width: auto) changes size with every update.
        width, height = self.size
        self.update(self._safe(text), layout=False)
        sized_by_text = self.styles.width is not None and self.styles.width.is_auto
        if sized_by_text or not width or self.visual.get_height(self.styles, width) != height:
            self.refresh(layout=True)

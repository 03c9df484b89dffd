"""Widgets of the study screen, one per tab, plus small shared pieces."""

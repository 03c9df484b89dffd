"""Screens: the study screen with its tabs, and small modal screens."""

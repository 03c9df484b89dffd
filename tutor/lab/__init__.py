"""The precision lab: the quality cliff and the lesson's claims, measured on the tutor's own model."""

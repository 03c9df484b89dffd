"""The lessons: their files read and checked (content), searched by title and words (finder)."""

"""What the learner did: the SQLite progress store and the quiz sessions kept in it."""

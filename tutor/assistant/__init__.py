"""The tutor's answers: retrieval over the lessons, the quoted passage, the model's reply and its check."""
